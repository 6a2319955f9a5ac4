"""A sweep directory's records, read defensively and tidied into one row per run.

Every ``results.json`` goes through :func:`lifecycle.record.check_record`: a file that is not JSON,
or a record of the wrong shape (a list, ``final: null`` on a completed run, a text where a number
belongs...), is noted with the file and the field and skipped, so one damaged record never hides the
others behind a traceback, and never turns into a wrong number in a table.

Which values count in means and verdicts (:func:`counted`): those of runs that reached their
training target (or had none), and only from measurements that converged. A value that does not
count is still in ``runs.csv`` and drawn hollow: it is shown, never averaged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lifecycle import sweep
from lifecycle.record import (
    RECORD,
    RecordError,
    check_record,
    reached_target,
    run_lr,
    stability_threshold,
    training_target,
    unconverged,
)

ADV_KEY = re.compile(r"^adv/(?P<attack>[a-z]+_[a-z0-9]+)/eps(?P<eps>[0-9.e+-]+)$")
EOS_THRESHOLD = 0.8  # eos_ratio at or above this: λ1 is at the stability threshold, limited by lr
NOT_AT_TARGET = ["job", "stop_reason", "target", "batch_size", "lr_rule", "lr", "momentum", "training"]
NOT_AT_TARGET += ["seed", "epochs", "steps", "train/acc", "train/loss"]
UNCONVERGED = ["job", "prefix", "step", "epoch", "rel_error", "batch_size", "lr_rule", "momentum"]
UNCONVERGED += ["training", "seed"]


def num(v: Any) -> float:
    """``v`` as a float; NaN for anything that is not a number (the record writes NaN as "nan")."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _dict(v: Any) -> Mapping:
    return v if isinstance(v, Mapping) else {}


# ---- reading -------------------------------------------------------------------------------
def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def load_runs(sweep_dir: Path, skip: Path | None = None) -> tuple[list[dict], list[str]]:
    """Every readable record under ``sweep_dir`` (none under ``skip``, the report's own folder).

    Returns the checked records and a note for each record that cannot be read: not JSON, or a
    field of the wrong kind (the note names the file and the field).
    """
    runs, notes = [], []
    for path in sorted(sweep_dir.rglob(RECORD)):
        if _under(path, skip):
            continue
        try:
            rec = check_record(json.loads(path.read_text()), "the record")
        except (OSError, UnicodeDecodeError, ValueError) as e:  # RecordError and JSON errors included
            why = str(e) if isinstance(e, RecordError) else f"not valid JSON: {e}"
            notes.append(f"unreadable record {path} ({why}): skipped, its job counts as having no result")
            continue
        if not rec:  # an empty object: a job that had not written its header yet
            notes.append(f"empty record {path}: skipped, its job counts as having no result")
            continue
        rec["job"] = (
            path.parent.relative_to(sweep_dir).as_posix() if path.parent != sweep_dir else path.parent.name
        )
        rec["dir"] = str(path.parent)
        runs.append(rec)
    return runs, notes


def grid_notes(sweep_dir: Path, runs: list[dict], skip: Path | None = None) -> list[str]:
    """What each sweep under ``sweep_dir`` (a ``multirun.yaml``) expects and what its runs are.

    Jobs of the grid with no record, records of jobs outside the grid (an earlier command's),
    and several records of one job. A run belongs to the nearest sweep above it.
    """
    sweeps = sorted(
        (p.parent for p in sweep_dir.rglob(sweep.MULTIRUN) if not _under(p, skip)),
        key=lambda d: len(d.parts),
        reverse=True,
    )
    owned: dict[Path, list[dict]] = {d: [] for d in sweeps}
    for r in runs:
        owner = next((d for d in sweeps if Path(r["dir"]).is_relative_to(d)), None)
        if owner is not None:
            owned[owner].append(r)
    notes = []
    for d in sorted(sweeps):
        where = "" if d == sweep_dir else f"{d.relative_to(sweep_dir).as_posix()}: "
        try:
            grid = sweep.read_grid(d / sweep.MULTIRUN)
        except sweep.SweepError as e:
            notes.append(f"{where}the grid is unknown, so missing jobs are not listed ({e})")
            continue
        by_key: dict[sweep.JobKey, list[str]] = {}
        for r in owned[d]:
            try:
                by_key.setdefault(grid.key(r.get("overrides") or []), []).append(r["job"])
            except sweep.SweepError as e:
                notes.append(f"{r['job']}: its overrides cannot be read ({e})")
        keys = grid.keys()
        missing = [grid.describe(job) for job, key in zip(grid.jobs, keys, strict=True) if key not in by_key]
        if missing:
            notes.append(
                f"{where}{len(missing)} of {len(keys)} jobs have no result yet: " + "; ".join(missing)
            )
        expected = set(keys)
        outside = sorted(job for key, jobs in by_key.items() if key not in expected for job in jobs)
        if outside:
            notes.append(
                f"{where}{len(outside)} {'run is' if len(outside) == 1 else 'runs are'} not in the grid of "
                f"{d / sweep.MULTIRUN} "
                "(from an earlier command?): " + "; ".join(outside)
            )
        for jobs in by_key.values():
            if len(jobs) > 1:
                notes.append(f"{len(jobs)} records of one job: " + "; ".join(sorted(jobs)))
    return notes


# ---- tidying -------------------------------------------------------------------------------
ADAPTIVE = ("abs", "absa", "noise")  # batch policies whose batch grows during training
ARMS = ("small", "large", "large_fgsm", *ADAPTIVE)  # conf/absa_arm/


def batch_policy(r: Mapping) -> str:
    """How a run chose its batch (experiment=absa_small's arms, conf/absa_arm/): ``abs``, ``absa``
    or ``noise`` from its ``callbacks.adaptive_batch`` (``policy``, ``adversarial``); a fixed batch:
    the ``absa_arm=`` override, else in the absa_small experiment ``large_fgsm`` (adversarial
    training), ``large`` (accumulated over ``max_micro_batch``) or ``small``; any other run: ``fixed``."""
    cfg = _dict(r.get("config"))
    ab = _dict(cfg.get("callbacks")).get("adaptive_batch")
    if isinstance(ab, Mapping):
        if ab.get("policy", "hessian") == "noise_scale":
            return "noise"
        return "absa" if ab.get("adversarial") else "abs"
    for o in r.get("overrides") or []:
        name, _, value = str(o).lstrip("+~").partition("=")
        if name == "absa_arm" and value in ARMS:
            return value
    if cfg.get("experiment_name") != "absa_small":
        return "fixed"
    if _dict(cfg.get("adversarial_training")).get("enabled"):
        return "large_fgsm"
    micro, b = cfg.get("max_micro_batch"), _dict(cfg.get("optimizer")).get("batch_size")
    return "large" if isinstance(micro, int) and isinstance(b, int) and b > micro else "small"


def fixed_batch(df: pd.DataFrame) -> pd.DataFrame:
    """The runs whose batch stayed what ``batch_size`` says (not ABS/ABSA/noise-scale): the ones the
    batch-size comparisons and figures may put at their ``batch_size``."""
    if "batch_policy" not in df:
        return df
    return df[~df["batch_policy"].isin(ADAPTIVE)]


def tidy(runs: list[dict], eos_threshold: float = EOS_THRESHOLD) -> pd.DataFrame:
    """One row per record. Beside the final metrics: ``reached_target``
    (:func:`lifecycle.record.reached_target`), ``target``, ``stability_threshold`` 2(1+β)/lr,
    ``eos_ratio`` λ1·lr/(2(1+β)) (how close λ1 came to it; lr before any schedule), ``lr_limited``
    (``eos_ratio >= eos_threshold``) and ``unconverged``: the measurements whose final value did not
    reach its stopping rule (comma-separated prefixes, e.g. ``hessian``; empty when all did)."""
    rows = []
    for r in runs:
        cfg = _dict(r.get("config"))
        opt, adv_train = _dict(cfg.get("optimizer")), _dict(cfg.get("adversarial_training"))
        final = _dict(r.get("final"))
        lr, momentum = run_lr(r)
        row = {
            "job": r["job"],
            "status": r.get("status"),
            "stop_reason": r.get("stop_reason"),
            "reached_target": reached_target(r),
            "target": training_target(r),
            "model": str(_dict(cfg.get("model")).get("_target_", "")).rsplit(".", 1)[-1],
            # models made before the option had ReLU everywhere
            "activation": _dict(cfg.get("model")).get("activation", "relu"),
            "data": _dict(cfg.get("data")).get("name"),
            "batch_size": opt.get("batch_size"),
            "lr_rule": opt.get("lr_rule"),
            "lr": lr,
            "lr_ratio": opt.get("lr_ratio"),
            "momentum": momentum,
            "training": "adversarial" if adv_train.get("enabled") else "natural",
            "batch_policy": batch_policy(r),
            "seed": cfg.get("seed"),
            "epochs": r.get("stopped_at_epoch"),
            "steps": r.get("stopped_at_step"),
            "wall_time_s": r.get("wall_time_s"),
            "error": r.get("error"),
        }
        for key in ("train_eval/loss", "train_eval/acc", "test/loss", "test/acc", "val/acc", "gen_gap/acc"):
            row[key.replace("train_eval", "train")] = num(final.get(key))
        for key, value in final.items():  # every final metric, a user callback's too
            row.setdefault(key, num(value))
        threshold = stability_threshold(lr, momentum)
        row["stability_threshold"] = math.nan if threshold is None else threshold
        row["eos_ratio"] = num(row.get("hessian/lambda_1")) / row["stability_threshold"]
        row["lr_limited"] = bool(row["eos_ratio"] >= eos_threshold)
        row["unconverged"] = ",".join(unconverged(final)) or None
        rows.append(row)
    return pd.DataFrame(rows)


def at_target(df: pd.DataFrame) -> pd.Series:
    """The runs that count in means and verdicts: reached their target, or had none to reach."""
    if "reached_target" not in df:
        return pd.Series(True, index=df.index)
    return ~df["reached_target"].eq(False)


def converged(df: pd.DataFrame, col: str) -> pd.Series:
    """The runs whose value of ``col`` came from a measurement that converged: ``col`` is not
    ``<prefix>/...`` for a prefix in the run's ``unconverged``."""
    if "unconverged" not in df:
        return pd.Series(True, index=df.index)

    def ok(prefixes: Any) -> bool:
        return not isinstance(prefixes, str) or not any(
            col.startswith(f"{p}/") for p in prefixes.split(",") if p
        )

    return df["unconverged"].map(ok).astype(bool)


def counted(df: pd.DataFrame, col: str) -> pd.Series:
    """The runs whose value of ``col`` counts in means and verdicts: at target and converged."""
    return at_target(df) & converged(df, col)


def adv_columns(df) -> dict[str, list[tuple[float, str]]]:
    """``{attack: [(eps, column), ...]}`` of the ``adv/<attack>/eps<eps>`` columns, eps ascending."""
    by_attack: dict[str, list[tuple[float, str]]] = {}
    for col in df.columns:
        m = ADV_KEY.match(col)
        if m:
            by_attack.setdefault(m["attack"], []).append((float(m["eps"]), col))
    return {a: sorted(v) for a, v in by_attack.items()}


def unconverged_table(runs: list[dict], df: pd.DataFrame) -> pd.DataFrame:
    """One row per (completed run, measurement) whose final value did not converge, with the
    record's latest ``unconverged`` entry of that measurement (step, epoch, relative error)."""
    by_job = {r["job"]: r for r in runs}
    rows = []
    done = df[(df["status"] == "completed") & df["unconverged"].notna()] if len(df) else df
    for row in done.to_dict("records"):
        flags = [u for u in by_job[row["job"]].get("unconverged") or [] if isinstance(u, dict)]
        for prefix in row["unconverged"].split(","):
            last = next((u for u in reversed(flags) if u.get("prefix") == prefix), {})
            rows.append(
                {"prefix": prefix, **{k: num(last.get(k)) for k in ("step", "epoch", "rel_error")}}
                | {k: row.get(k) for k in UNCONVERGED if k not in ("prefix", "step", "epoch", "rel_error")}
            )
    return pd.DataFrame(rows).reindex(columns=UNCONVERGED).astype({"step": "Int64", "epoch": "Int64"})
