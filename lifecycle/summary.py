"""The console summary of a job: status, losses and accuracies, spectrum, robust accuracy."""

from __future__ import annotations

from pathlib import Path

from lifecycle.record import RECORD, unconverged


def _fmt(v, spec: str) -> str:
    """A number as ``spec``, also a non-finite one as the record writes it ("nan"); else as text."""
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _settings_of(record: dict, prefix: str) -> dict:
    """The config of the callback that logs under ``prefix`` (its ``prefix`` key, else its name)."""
    callbacks = (record.get("config") or {}).get("callbacks") or {}
    for name, c in callbacks.items():
        if isinstance(c, dict) and c.get("prefix", name) == prefix:
            return c
    return {}


def unconverged_note(record: dict, prefix: str) -> str:
    """`` (UNCONVERGED: rel_error 0.27 > tol 0.0001)`` when the final ``prefix`` measurement missed
    its stop (:func:`lifecycle.record.unconverged`), else ``""``."""
    f = record.get("final") or {}
    if prefix not in unconverged(f):
        return ""
    c = _settings_of(record, prefix)
    why = []
    rel, tol = f.get(f"{prefix}/rel_error"), c.get("tol")
    trace_missed = f.get(f"{prefix}/trace_converged") == 0
    if isinstance(rel, float) and (tol is None or rel > tol or not trace_missed):
        why.append(f"rel_error {rel:.3g}" + (f" > tol {tol:g}" if tol is not None else ""))
    if trace_missed:
        rtol = c.get("trace_rtol")
        why.append(
            f"trace stderr {f.get(f'{prefix}/trace_stderr', float('nan')):.3g}"
            + (f" > trace_rtol {rtol:g} x |trace|" if rtol is not None else "")
        )
    return f" (UNCONVERGED: {', '.join(why) or 'stop not reached'})"


def summarize(record: dict, out_dir: Path) -> str:
    f = record.get("final", {})

    def num(key):
        return _fmt(f.get(key), ".4f")

    lines = [
        f"[train] status: {record.get('status')} (stopped: {record.get('stop_reason')}) "
        f"after {record.get('stopped_at_epoch')} epochs / {record.get('stopped_at_step')} steps, "
        f"{_fmt(record.get('wall_time_s', 0), '.0f')} s",
        f"[train] train loss {num('train_eval/loss')}  acc {num('train_eval/acc')}   "
        f"test loss {num('test/loss')}  acc {num('test/acc')}   val acc {num('val/acc')}",
    ]
    split, wall = record.get("time_split"), record.get("wall_time_s") or 0.0
    if split and wall:
        lines.append(
            "[train] time: "
            + ", ".join(f"{part} {s:.0f} s ({100 * s / wall:.0f}%)" for part, s in split.items())
        )
    if record.get("data_on_device") is not None:
        lines.append(
            "[train] data: "
            + (
                "gathered on the device (data.on_device)"
                if record["data_on_device"]
                else "DataLoader batches (data.on_device off)"
            )
        )
    hessian = [
        f"{k.removeprefix('hessian/')} {_fmt(f[k], '.4g')}"
        for k in sorted(f)
        if k.startswith("hessian/lambda")
    ]
    if "hessian/trace" in f:
        hessian.append(f"trace {_fmt(f['hessian/trace'], '.4g')}")
    if hessian:
        lines.append(f"[train] Hessian{unconverged_note(record, 'hessian')}: " + "  ".join(hessian))
    earlier: dict[str, list] = {}
    for row in record.get("unconverged") or []:
        earlier.setdefault(row.get("prefix"), []).append(row.get("epoch"))
    for prefix, epochs in sorted(earlier.items(), key=lambda item: str(item[0])):
        lines.append(
            f"[train] UNCONVERGED {prefix} measurements at epoch(s) {', '.join(str(e) for e in epochs)}: "
            f"their values are short of the stop's accuracy (record: unconverged)"
        )
    attacks: dict[str, list[str]] = {}
    for k in sorted(f, key=lambda k: (k.split("/eps")[0], float(k.split("/eps")[1]) if "/eps" in k else 0)):
        if k.startswith("adv/") and "/eps" in k:
            attack, eps = k.removeprefix("adv/").split("/eps")
            attacks.setdefault(attack, []).append(f"{float(eps):g}:{_fmt(f[k], '.3f')}")
    for attack, values in attacks.items():
        lines.append(f"[train] robust accuracy {attack} (eps:acc) " + " ".join(values))
    lines.append(
        f"[train] run dir: {out_dir}  (config: .hydra/config.yaml, record: {RECORD}, "
        f"checkpoints: checkpoints/, logs: csv/ or wandb/)"
    )
    return "\n".join(lines)
