"""λ1, test and robust accuracy against batch size: per (lr rule, momentum, training, activation), the largest
batch size of the cell against its smallest (the grid's, whichever reached its target)."""

from __future__ import annotations

import math

import pandas as pd

from reporting.verdicts.base import BASE_METRICS, Thresholds, cells, compare, completed, robust_column

KIND = "batch_size"
EXPECTED = {  # the papers' trends (docs/study.md), natural training: (metric, lr rule) -> verdict vs batch size
    ("lambda_1", "fixed"): "rises",
    ("lambda_1", "ratio"): "flat",
    ("test_acc", "fixed"): "falls",
    ("test_acc", "ratio"): "flat",
    ("robust_acc", "fixed"): "falls",
    ("robust_acc", "ratio"): "flat",
}


def title(th: Thresholds) -> str:
    return "## Batch size: the largest against the smallest"


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    rcol, why = robust_column(df, th.robust_eps)
    notes = [] if rcol else [f"robust accuracy verdicts skipped: {why}"]
    metrics = BASE_METRICS + ([("robust_acc", rcol, "points")] if rcol else [])
    rows = []
    for fixed, cell in cells(df, ["lr_rule", "momentum", "training", "activation"]):
        sizes = sorted(cell["batch_size"].dropna().unique())
        if len(sizes) < 2:
            continue
        sub = completed(df, cell)
        for name, col, measure in metrics:
            row = {"kind": KIND, "metric": name, "column": col, **fixed, "batch_size": math.nan}
            row |= compare(sub, "batch_size", sizes[0], sizes[-1], col, measure, th)
            natural = fixed["training"] == "natural"
            row["expected"] = EXPECTED.get((name, fixed["lr_rule"]), "") if natural else ""
            rows.append(row)
    return rows, notes
