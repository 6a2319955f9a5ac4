"""The study's trends judged over seeds, and the tables that show them (``verdicts.csv``, ``verdicts.md``).

Each study's comparisons live in a module of their own, registered in :data:`STUDIES`; a module
exposes ``KIND`` (its rows' ``kind``), ``title(th)`` (its heading in ``verdicts.md``) and
``verdicts(df, th) -> (rows, notes)``, built on the shared :func:`compare` (:mod:`.base`). A new
study is a new module added to :data:`STUDIES`, nothing else: the table, the markdown and the
notes follow the tuple's order. Optional: ``ALL_RUNS = True`` (it also sees the adaptive-batch runs,
which the others do not) and ``tables(df, th)`` (markdown lines put under its verdicts).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from reporting.runs import NOT_AT_TARGET, at_target, fixed_batch
from reporting.verdicts import absa, batch_size, ggn_share, momentum, saddle_free, training
from reporting.verdicts.base import (
    COLUMNS,
    ROBUST_ATTACKS,
    VERDICTS,
    Thresholds,
    classify,
    compare,
    robust_column,
)
from reporting.verdicts.worst_case import worst_case_gap

__all__ = [
    "STUDIES",
    "VERDICTS",
    "Thresholds",
    "classify",
    "compare",
    "robust_column",
    "verdicts",
    "worst_case_gap",
    "write_verdicts",
]

STUDIES = (batch_size, momentum, training, saddle_free, ggn_share, absa)


def verdicts(df: pd.DataFrame, th: Thresholds | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every study's verdicts (:data:`STUDIES`) as one table, and notes on what was skipped.

    Only completed runs count, and of them the values that count (:func:`reporting.runs.counted`).
    A study sees only the fixed-batch runs (:func:`reporting.runs.fixed_batch`: an ABS run's
    ``batch_size`` is only where it started) unless it sets ``ALL_RUNS``.
    """
    th = th or Thresholds()
    if not len(df) or "batch_size" not in df:
        return pd.DataFrame([]), []
    rows: list[dict] = []
    notes: list[str] = []
    for study in STUDIES:
        more, why = study.verdicts(df if getattr(study, "ALL_RUNS", False) else fixed_batch(df), th)
        rows += more
        notes += why
    return pd.DataFrame(rows, columns=COLUMNS), notes


def md_table(df: pd.DataFrame, columns: list[str]) -> list[str]:
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[columns].itertuples(index=False)]
    return lines


def write_verdicts(df, table, gap, notes, th: Thresholds, out: Path) -> None:
    """``verdicts.csv`` and ``verdicts.md`` (thresholds, verdicts with their per-seed values, runs
    limited by lr, runs short of their target, the worst-case gap) in ``out``."""
    table.to_csv(out / "verdicts.csv", index=False)
    md = [
        "# Verdicts",
        "",
        f"Thresholds: ratio {th.ratio:g} (λ1: *rises* if every seed's ratio is >= {th.ratio:g}, *falls* "
        f"if every one is <= 1/{th.ratio:g} = {1 / th.ratio:.3g}, *flat* if every one is in between, else "
        f"*mixed*); points {th.points:g} (accuracies: the same with differences in percentage points, "
        f"+/-{th.points:g}); at least {th.min_seeds} seeds at target at each point compared, else "
        f"*untestable*; robust accuracy at eps {th.robust_eps:g} (first of {', '.join(ROBUST_ATTACKS)} "
        f"the runs have); momentum: β={th.momenta[1]:g} vs β={th.momenta[0]:g}; learning-rate limited: "
        f"eos_ratio = λ1·lr/(2(1+β)) >= {th.eos:g}.",
        "",
        "Only completed runs that reached their training target (or had none) count. *expected* is "
        "the papers' trend (natural training; docs/study.md). Per seed: the value at the first point -> at the second "
        "(accuracies in %), and the ratio or the difference judged.",
        "",
    ]
    cols = [
        "metric",
        "lr_rule",
        "momentum",
        "training",
        "activation",
        "batch_size",
        "compared",
        "verdict",
        "expected",
    ]
    cols += ["per_seed", "reason"]
    for study in STUDIES:
        part = table[table["kind"] == study.KIND] if len(table) else table
        if len(part):
            md += [study.title(th), "", *md_table(part, [c for c in cols if part[c].notna().any()]), ""]
            md += study.tables(df, th) if hasattr(study, "tables") else []
    ok = df[df["status"] == "completed"] if len(df) else df
    md += [f"## Runs limited by the learning rate (eos_ratio >= {th.eos:g})", ""]
    lim = ok[ok["lr_limited"]] if "lr_limited" in ok else ok.iloc[:0]
    if len(lim):
        md += md_table(lim, ["job", "batch_size", "lr", "momentum", "hessian/lambda_1", "eos_ratio"])
    else:
        md.append("none")
    md += ["", "## Runs short of their training target (hollow markers, left out of means and verdicts)", ""]
    short = ok[~at_target(ok)] if len(ok) else ok
    if len(short):
        md += md_table(short, [c for c in NOT_AT_TARGET if c in short])
    else:
        md.append("none")
    md += ["", "## Worst-case gap: epoch-end PGD minus AutoAttack accuracy (points)", ""]
    if gap is not None:
        md += md_table(gap, list(gap.columns))
    else:
        md.append("no adv/autoattack_linf/eps* keys in the runs: skipped")
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (out / "verdicts.md").write_text("\n".join(md) + "\n")
