"""What every study's verdicts share: the thresholds, one comparison over seeds, its classification.

A verdict compares one metric at two points of one hyperparameter (``vary``), seed by seed, within
a cell of runs that agree on everything else; it is *untestable* rather than guessed when too few
seeds have a value that counts (:func:`reporting.runs.counted`: at target, measurement converged).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pandas as pd

from reporting.runs import EOS_THRESHOLD, adv_columns, counted

ROBUST_ATTACKS = ("autoattack_linf", "worst_linf", "pgd_linf")  # the robust accuracy judged, first found
VERDICTS = ("rises", "falls", "flat", "mixed", "untestable")
COLUMNS = ["kind", "metric", "lr_rule", "momentum", "training", "batch_size", "compared", "verdict"]
COLUMNS += ["expected", "measure", "n_seeds", "values", "per_seed", "seeds_at_target", "reason", "column"]
COLUMNS += ["activation"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What the verdicts call a change (the ``report.py`` options of the same names)."""

    ratio: float = 1.5  # λ1: rises if every seed's ratio >= this, falls if every one <= 1/this
    points: float = 2.0  # accuracies: rises/falls if every seed's difference is >= +/- this many points
    min_seeds: int = 2  # fewer seeds at target at a grid point compared: untestable
    eos: float = EOS_THRESHOLD  # eos_ratio >= this: the run is limited by its learning rate
    robust_eps: float = 0.1  # the eps of the robust accuracy judged
    momenta: tuple[float, float] = (0.0, 0.9)  # momentum verdicts: the second minus the first

    def __post_init__(self):
        for ok, name, value, must in (
            (self.ratio > 1, "ratio threshold", self.ratio, "must be > 1"),
            (self.points >= 0, "points threshold", self.points, "must be >= 0"),
            (self.min_seeds >= 1, "min seeds", self.min_seeds, "must be >= 1"),
            (self.eos > 0, "eos threshold", self.eos, "must be > 0"),
            (self.robust_eps >= 0, "robust eps", self.robust_eps, "must be >= 0"),
            (len(self.momenta) == 2, "momenta", self.momenta, "must be two values"),
        ):
            if not ok:
                raise ValueError(f"{name} {value!r} {must}")


def classify(values: list[float], measure: str, th: Thresholds) -> str:
    """rises / falls / flat / mixed for per-seed ratios (``measure="ratio"``) or point differences.

    rises if every value >= up, falls if every value <= down, flat if every value is within
    [down, up], else mixed; up/down are ``ratio``/``1/ratio`` or ``+points``/``-points``. A value
    exactly on a threshold counts as a change (rises/falls are tested first).
    """
    up, down = (th.ratio, 1 / th.ratio) if measure == "ratio" else (th.points, -th.points)
    if all(v >= up for v in values):
        return "rises"
    if all(v <= down for v in values):
        return "falls"
    if all(down <= v <= up for v in values):
        return "flat"
    return "mixed"


def robust_column(df: pd.DataFrame, eps: float) -> tuple[str | None, str]:
    """The robust accuracy the verdicts judge: ``adv/<attack>/eps<eps>`` for the first attack of
    :data:`ROBUST_ATTACKS` the runs have at ``eps``; else None and why."""
    attacks = adv_columns(df)
    for attack in ROBUST_ATTACKS:
        for e, col in attacks.get(attack, []):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return col, ""
    have = "; ".join(
        f"{a}: eps {', '.join(f'{e:g}' for e, _ in cols)}" for a, cols in sorted(attacks.items())
    )
    return None, (
        f"no robust accuracy at eps {eps:g} from {', '.join(ROBUST_ATTACKS)} (runs have: {have or 'none'})"
    )


def _fmt(v: float, pct: bool) -> str:
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def same(x, v) -> bool:
    """Grid values compared as values (a momentum of 0.9 read back as 0.9000000001 is 0.9)."""
    if isinstance(x, int | float) and isinstance(v, int | float):
        return math.isclose(x, v, rel_tol=1e-9, abs_tol=1e-12)
    return x == v


def point(vary: str, v) -> str:
    prefix = {"batch_size": "B=", "momentum": "β="}.get(vary)
    return f"{prefix}{v:g}" if prefix else str(v)


def compare(cell: pd.DataFrame, vary: str, lo, hi, col: str, measure: str, th: Thresholds) -> dict:
    """One verdict: ``col`` at ``vary = hi`` against ``vary = lo``, per seed, within ``cell``.

    ``cell`` holds the candidate runs (completed; those whose value does not count, short of their
    target or from an unconverged measurement, are dropped here). Per seed: hi/lo
    (``measure="ratio"``) or 100·(hi − lo) points (``"points"``, accuracies in [0, 1]). Untestable if
    either point has fewer than ``th.min_seeds`` seeds with a value that counts, or fewer seeds than
    that have both (or a ratio of non-positive values).
    """
    pct = measure == "points"
    if col not in cell:  # no run logged it (e.g. a sweep without the Hessian callback)
        cell = cell.assign(**{col: math.nan})
    runs = cell[counted(cell, col)].dropna(subset=[col])
    per = {}
    for v in (lo, hi):
        sel = runs[vary].map(lambda x, v=v: same(x, v)).astype(bool)  # empty: still a row mask
        per[v] = runs.loc[sel].groupby("seed", dropna=False)[col].mean()
    counts = {v: len(per[v]) for v in (lo, hi)}
    rows, values = [], []
    for seed in sorted(set(per[lo].index) & set(per[hi].index), key=str):
        a, b = float(per[lo][seed]), float(per[hi][seed])
        if pct:
            r = 100 * (b - a)
            rows.append(f"seed {seed}: {_fmt(a, pct)} -> {_fmt(b, pct)} ({r:+.1f} pts)")
        else:
            r = b / a if a > 0 and b > 0 else math.nan
            rows.append(f"seed {seed}: {_fmt(a, pct)} -> {_fmt(b, pct)} (x{r:.3g})")
        if math.isfinite(r):
            values.append(r)
    few = [v for v in (lo, hi) if counts[v] < th.min_seeds]
    if cell[col].isna().all():
        verdict, reason = "untestable", f"no run of this cell measured {col}"
    elif few:
        verdict = "untestable"
        reason = (
            "; ".join(
                f"{point(vary, v)}: {counts[v]} seed{'s' if counts[v] != 1 else ''} at target" for v in few
            )
            + f" (need {th.min_seeds})"
        )
    elif len(values) < th.min_seeds:
        verdict = "untestable"
        reason = f"{len(values)} seeds comparable at both points (need {th.min_seeds})"
    else:
        verdict, reason = classify(values, measure, th), ""
    return {
        "compared": f"{point(vary, hi)} vs {point(vary, lo)}",
        "measure": measure,
        "verdict": verdict,
        "n_seeds": len(values),
        "values": ", ".join(f"{v:.4g}" for v in values),
        "per_seed": "; ".join(rows),
        "seeds_at_target": f"{point(vary, lo)}: {counts[lo]}; {point(vary, hi)}: {counts[hi]}",
        "reason": reason,
    }


def cells(df: pd.DataFrame, keys: list[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """The runs grouped by ``keys`` (NaN a value of its own), each group with its key values."""
    for values, cell in df.groupby(keys, dropna=False):
        yield dict(zip(keys, values, strict=True)), cell


def completed(df: pd.DataFrame, cell: pd.DataFrame) -> pd.DataFrame:
    """The completed runs of ``cell`` (a cell is found over every run, so a grid point whose runs
    all failed still makes a comparison, then untestable)."""
    done = df[df["status"] == "completed"]
    return done.loc[done.index.intersection(cell.index)]


BASE_METRICS = [("lambda_1", "hessian/lambda_1", "ratio"), ("test_acc", "test/acc", "points")]
"""(name, column, measure) judged by the studies; the robust accuracy is added where the runs have it."""
