"""Paper B's saddle-free inner loop: is there negative curvature in input space, and where?

For a network piecewise linear in its input (ReLU) the claim is that no example's input Hessian
has a negative eigenvalue (``input/<set>/frac_negative`` = 0 at clean and adversarial points); for
a smooth activation it is expected to stop holding. Judged per (activation, batch size, point set)
over the seeds whose input measurement counts: *holds* if every seed's fraction is 0, *fails* if
every seed's is above 0, else *mixed*; *untestable* with fewer than ``min_seeds`` seeds. Beside it,
how the examples' mean top input eigenvalue moves with batch size (the usual ratio verdict).
"""

from __future__ import annotations

import re

import pandas as pd

from reporting.runs import counted
from reporting.verdicts.base import Thresholds, cells, compare, completed

KIND = "saddle_free"
SET = re.compile(r"^input/(?P<set>[^/]+)/frac_negative$")


def title(th: Thresholds) -> str:
    return "## Saddle-free inner loop: negative input curvature (frac_negative) and input λ_max vs batch size"


def point_sets(df: pd.DataFrame) -> list[str]:
    return sorted(m["set"] for c in df.columns if (m := SET.match(c)))


def _claim(sub: pd.DataFrame, col: str, th: Thresholds) -> dict:
    ok = sub[counted(sub, col) & sub[col].notna()].sort_values("seed")
    values = [float(v) for v in ok[col]]
    per_seed = "; ".join(f"seed {s}: {v:.3g}" for s, v in zip(ok["seed"], values, strict=True))
    if len(values) < th.min_seeds:
        verdict, reason = "untestable", f"{len(values)} seeds with a converged measurement (< {th.min_seeds})"
    elif all(v == 0 for v in values):
        verdict, reason = "holds", "no example with λ_min < -neg_tol·λ_max in any seed"
    elif all(v > 0 for v in values):
        verdict, reason = "fails", "examples with negative input curvature in every seed"
    else:
        verdict, reason = "mixed", "negative input curvature in some seeds only"
    return {"verdict": verdict, "reason": reason, "per_seed": per_seed, "n_seeds": len(values)}


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    sets = point_sets(df)
    if not sets:
        return [], []
    rows: list[dict] = []
    for fixed, cell in cells(df, ["activation", "batch_size"]):
        sub = completed(df, cell)
        for name in sets:
            col = f"input/{name}/frac_negative"
            expected = "holds" if fixed["activation"] == "relu" else "fails"
            rows.append(
                {"kind": KIND, "metric": f"frac_negative {name}", "column": col, "activation": fixed["activation"],
                 "batch_size": fixed["batch_size"], "expected": expected, "measure": "all zero"}
                | _claim(sub, col, th)
            )  # fmt: skip
    sizes = sorted(df["batch_size"].dropna().unique())
    if len(sizes) >= 2:
        for fixed, cell in cells(df, ["activation"]):
            sub = completed(df, cell)
            for name in sets:
                col = f"input/{name}/top_mean"
                row = {"kind": KIND, "metric": f"input_lambda_max {name}", "column": col,
                       "activation": fixed["activation"]}  # fmt: skip
                rows.append(row | compare(sub, "batch_size", sizes[0], sizes[-1], col, "ratio", th))
    return rows, []
