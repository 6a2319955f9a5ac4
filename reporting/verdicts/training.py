"""λ1 of adversarial against natural training: per (lr rule, momentum, batch size) with runs of both."""

from __future__ import annotations

import math

import pandas as pd

from reporting.verdicts.base import Thresholds, cells, compare, completed

KIND = "training"


def title(th: Thresholds) -> str:
    return "## Adversarial against natural training: λ1"


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    if not {"natural", "adversarial"} <= set(df["training"]):
        return [], []
    rows = []
    for fixed, cell in cells(df, ["lr_rule", "momentum", "activation", "batch_size"]):
        if not {"natural", "adversarial"} <= set(cell["training"]):
            continue
        sub = completed(df, cell)
        row = {"kind": KIND, "metric": "lambda_1", "column": "hessian/lambda_1", **fixed}
        row |= compare(sub, "training", "natural", "adversarial", "hessian/lambda_1", "ratio", th)
        rows.append(row | {"training": math.nan, "expected": "falls"})
    return rows, []
