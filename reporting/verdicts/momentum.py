"""Test accuracy and λ1 with momentum ``th.momenta[1]`` against ``th.momenta[0]``: per (lr rule,
training, batch size) whose grid has runs of both."""

from __future__ import annotations

import math

import pandas as pd

from reporting.verdicts.base import BASE_METRICS, Thresholds, cells, compare, completed, same

KIND = "momentum"


def title(th: Thresholds) -> str:
    return f"## Momentum: β={th.momenta[1]:g} against β={th.momenta[0]:g}"


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    lo, hi = th.momenta
    momenta = df["momentum"].dropna()
    if not (momenta.map(lambda m: same(m, lo)).any() and momenta.map(lambda m: same(m, hi)).any()):
        if df["momentum"].nunique() > 1:
            return [], [f"momentum verdicts skipped: the runs do not have both momentum {lo:g} and {hi:g}"]
        return [], []
    rows = []
    for fixed, cell in cells(df, ["lr_rule", "training", "activation", "batch_size"]):
        if not all(cell["momentum"].map(lambda x, m=m: same(x, m)).any() for m in (lo, hi)):
            continue  # the grid has no such pair here (a point whose runs failed still counts)
        sub = completed(df, cell)
        for name, col, measure in BASE_METRICS:
            row = {"kind": KIND, "metric": name, "column": col, **fixed, "momentum": math.nan}
            rows.append(row | compare(sub, "momentum", lo, hi, col, measure, th) | {"expected": ""})
    return rows, []
