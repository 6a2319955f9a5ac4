"""The console summary of a job: status, losses and accuracies, spectrum, robust accuracy."""

from __future__ import annotations

from pathlib import Path

from lifecycle.record import RECORD


def summarize(record: dict, out_dir: Path) -> str:
    f = record.get("final", {})

    def num(key):
        v = f.get(key)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"[train] status: {record.get('status')} (stopped: {record.get('stop_reason')}) "
        f"after {record.get('stopped_at_epoch')} epochs / {record.get('stopped_at_step')} steps, "
        f"{record.get('wall_time_s', 0):.0f} s",
        f"[train] train loss {num('train_eval/loss')}  acc {num('train_eval/acc')}   "
        f"test loss {num('test/loss')}  acc {num('test/acc')}   val acc {num('val/acc')}",
    ]
    split, wall = record.get("time_split"), record.get("wall_time_s") or 0.0
    if split and wall:
        lines.append(
            "[train] time: "
            + ", ".join(f"{part} {s:.0f} s ({100 * s / wall:.0f}%)" for part, s in split.items())
        )
    hessian = [
        f"{k.removeprefix('hessian/')} {f[k]:.4g}" for k in sorted(f) if k.startswith("hessian/lambda")
    ]
    if "hessian/trace" in f:
        hessian.append(f"trace {f['hessian/trace']:.4g}")
    if hessian:
        lines.append("[train] Hessian: " + "  ".join(hessian))
    attacks: dict[str, list[str]] = {}
    for k in sorted(f, key=lambda k: (k.split("/eps")[0], float(k.split("/eps")[1]) if "/eps" in k else 0)):
        if k.startswith("adv/") and "/eps" in k:
            attack, eps = k.removeprefix("adv/").split("/eps")
            attacks.setdefault(attack, []).append(f"{float(eps):g}:{f[k]:.3f}")
    for attack, values in attacks.items():
        lines.append(f"[train] robust accuracy {attack} (eps:acc) " + " ".join(values))
    lines.append(
        f"[train] run dir: {out_dir}  (config: .hydra/config.yaml, record: {RECORD}, "
        f"checkpoints: checkpoints/, logs: csv/ or wandb/)"
    )
    return "\n".join(lines)
