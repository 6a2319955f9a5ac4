"""ABS / ABSA (Yao et al.; experiment=absa_small): does the adaptive batch keep small-batch accuracy
with fewer steps, and beat the large batch?

The runs' arm is ``batch_policy`` (:func:`reporting.runs.batch_policy`). For each adaptive arm
(``absa``, ``abs``, and the gradient-noise-scale ``noise``), seed by seed against the baseline arm's
run of the same seed, the paper's claims:

- ``reaches_small``: test accuracy within ``ACC_POINTS`` points of arm ``small`` (difference >=
  −1 point) **and** at least ``STEP_FACTOR`` × fewer optimizer steps (``stopped_at_step``);
- ``beats_large``: test accuracy above arm ``large``'s (difference > 0);
- ``robust_beats_large``: the report's robust accuracy (:func:`~reporting.verdicts.base.robust_column`
  at ``Thresholds.robust_eps``) above arm ``large``'s.

A claim *holds* if every compared seed meets it, *fails* if none does, else *mixed*; *untestable*
with fewer than ``min_seeds`` seeds where both runs have values that count
(:func:`reporting.runs.counted`). Beside the verdicts, :func:`tables` puts a per-arm table in
``verdicts.md``: the means over seeds of test and robust accuracy, steps, final λ1 and wall time.
"""

from __future__ import annotations

import math

import pandas as pd

from reporting.runs import ARMS, counted
from reporting.verdicts.base import Thresholds, completed, robust_column

KIND = "absa"
ALL_RUNS = True  # this study reads the adaptive arms, which the other studies leave out
ADAPTIVE_ARMS = ("absa", "abs", "noise")
ACC_POINTS = 1.0  # "reaches the small batch's accuracy": at most this many points below it
STEP_FACTOR = 3.0  # ... with at least this many times fewer optimizer steps


def title(th: Thresholds) -> str:
    return (
        f"## ABS / ABSA against fixed batches: small-batch accuracy (within {ACC_POINTS:g} pt) with "
        f">= {STEP_FACTOR:g}x fewer steps; above the large batch"
    )


def _per_seed(sub: pd.DataFrame, arm: str, col: str) -> pd.Series:
    """``col``'s value per seed for ``arm`` (mean if a seed has several runs), values that count only."""
    runs = sub[(sub["batch_policy"] == arm) & counted(sub, col) & sub[col].notna()]
    return runs.groupby("seed")[col].mean()


def _steps(df: pd.DataFrame) -> pd.Series:
    steps = pd.to_numeric(df["steps"], errors="coerce") if "steps" in df else pd.Series(math.nan, df.index)
    if "abs/optimizer_steps" in df:
        steps = steps.fillna(df["abs/optimizer_steps"])
    return steps


def _judge(met: dict, th: Thresholds, why_not: str) -> tuple[str, str]:
    if len(met) < th.min_seeds:
        return "untestable", f"{len(met)} seeds with both runs counted (need {th.min_seeds})"
    if all(met.values()):
        return "holds", ""
    if not any(met.values()):
        return "fails", f"no seed: {why_not}"
    return "mixed", "seeds " + ", ".join(str(s) for s, ok in met.items() if not ok) + f": {why_not}"


def _reaches_small(sub: pd.DataFrame, arm: str, th: Thresholds) -> dict:
    acc = {a: _per_seed(sub, a, "test/acc") for a in (arm, "small")}
    steps = {a: _per_seed(sub, a, "_steps") for a in (arm, "small")}
    seeds = sorted(set(acc[arm].index) & set(acc["small"].index) & set(steps[arm].index) & set(steps["small"].index), key=str)  # fmt: skip
    met, rows = {}, []
    for s in seeds:
        diff = 100 * (acc[arm][s] - acc["small"][s])
        factor = steps["small"][s] / steps[arm][s] if steps[arm][s] > 0 else math.nan
        met[s] = bool(diff >= -ACC_POINTS and factor >= STEP_FACTOR)
        rows.append(
            f"seed {s}: acc {100 * acc['small'][s]:.1f} -> {100 * acc[arm][s]:.1f} ({diff:+.1f} pts), "
            f"steps {steps['small'][s]:.0f} -> {steps[arm][s]:.0f} ({factor:.3g}x fewer)"
        )
    verdict, reason = _judge(
        met, th, f"more than {ACC_POINTS:g} pt below or under {STEP_FACTOR:g}x fewer steps"
    )
    return {"compared": f"{arm} vs small", "measure": f"acc >= -{ACC_POINTS:g} pt and steps / {STEP_FACTOR:g}",
            "verdict": verdict, "reason": reason, "per_seed": "; ".join(rows), "n_seeds": len(met),
            "values": ", ".join(r.split(": ", 1)[1] for r in rows)}  # fmt: skip


def _beats_large(sub: pd.DataFrame, arm: str, col: str, th: Thresholds) -> dict:
    per = {a: _per_seed(sub, a, col) for a in (arm, "large")}
    seeds = sorted(set(per[arm].index) & set(per["large"].index), key=str)
    diffs = {s: 100 * (per[arm][s] - per["large"][s]) for s in seeds}
    met = {s: d > 0 for s, d in diffs.items()}
    verdict, reason = _judge(met, th, "not above the large batch")
    rows = [
        f"seed {s}: {100 * per['large'][s]:.1f} -> {100 * per[arm][s]:.1f} ({diffs[s]:+.1f} pts)"
        for s in seeds
    ]
    return {"compared": f"{arm} vs large", "measure": "points > 0", "verdict": verdict, "reason": reason,
            "per_seed": "; ".join(rows), "n_seeds": len(met),
            "values": ", ".join(f"{d:.4g}" for d in diffs.values())}  # fmt: skip


def _arm_runs(df: pd.DataFrame) -> pd.DataFrame:
    if "batch_policy" not in df:
        return df.iloc[:0]
    sub = df[df["batch_policy"].isin(ARMS)]
    return completed(df, sub).assign(_steps=_steps(sub)) if len(sub) else sub


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    sub = _arm_runs(df)
    arms = set(sub["batch_policy"]) if len(sub) else set()
    if not arms & set(ADAPTIVE_ARMS):
        return [], []
    rcol, why = robust_column(sub, th.robust_eps)
    notes = [] if rcol else [f"ABS/ABSA robust-accuracy verdicts skipped: {why}"]
    rows = []
    for arm in ADAPTIVE_ARMS:
        if arm not in set(df["batch_policy"]):
            continue
        base = {"kind": KIND, "batch_size": math.nan, "expected": "holds"}
        rows.append(base | {"metric": "reaches_small", "column": "test/acc"} | _reaches_small(sub, arm, th))
        rows.append(
            base | {"metric": "beats_large", "column": "test/acc"} | _beats_large(sub, arm, "test/acc", th)
        )
        if rcol:
            rows.append(
                base | {"metric": "robust_beats_large", "column": rcol} | _beats_large(sub, arm, rcol, th)
            )
    return rows, notes


def arm_table(df: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    """Per arm, means over its completed runs' values that count: test and robust accuracy (%),
    optimizer steps, final λ1, wall time (s); ``seeds``: how many runs the arm has."""
    sub = _arm_runs(df)
    if not len(sub):
        return pd.DataFrame([])
    rcol, _ = robust_column(sub, th.robust_eps)
    cols = {"test_acc_%": "test/acc", "robust_acc_%": rcol, "optimizer_steps": "_steps",
            "lambda_1": "hessian/lambda_1", "wall_time_s": "wall_time_s"}  # fmt: skip
    rows = []
    for arm in [a for a in ARMS if a in set(sub["batch_policy"])]:
        runs = sub[sub["batch_policy"] == arm]
        row = {"arm": arm, "seeds": int(runs["seed"].nunique())}
        for name, col in cols.items():
            v = (
                pd.to_numeric(runs[col], errors="coerce")[counted(runs, col)]
                if col in runs
                else pd.Series([])
            )
            row[name] = float(v.mean()) * (100 if name.endswith("%") else 1) if v.notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def tables(df: pd.DataFrame, th: Thresholds) -> list[str]:
    """Markdown lines put under this study's verdicts: :func:`arm_table`."""
    from reporting.verdicts import md_table  # the package imports this module first

    t = arm_table(df, th)
    if not len(t):
        return []
    return ["Per arm, mean over seeds (values that count):", "", *md_table(t, list(t.columns)), ""]
