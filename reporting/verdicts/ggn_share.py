"""How much of the sharpness the Gauss-Newton part carries, and which layer carries it, per batch size.

Paper B's "saddle points are not the cause" reading: near a minimum the Hessian is close to its
generalized Gauss-Newton (the functional part ``H - G`` is small), so λ₁ and the trace are the
GGN's. Needs runs with a second spectrum callback on the GGN (``'callbacks=[default,ggn]'``:
``ggn/lambda_1``, ``ggn/trace``) beside the Hessian's (``hessian/lambda_1``, ``hessian/trace``),
at the end of training. Per (lr rule, momentum, training, batch size), over the seeds whose values
count: the GGN's share ``ggn/x / hessian/x`` *holds* (every seed within :data:`SHARE` of 1),
*fails* (every seed outside), else *mixed*; *untestable* below ``min_seeds``. And the layer with the
largest per-layer λ₁ (``hessian/layer/<block>/lambda_1``, callback option ``blocks``): its name if
every seed agrees, else *mixed*, with each seed's block λ₁ over the whole λ₁.
"""

from __future__ import annotations

import re

import pandas as pd

from reporting.runs import counted
from reporting.verdicts.base import Thresholds, cells, completed

KIND = "ggn_share"
SHARE = 0.1
"""The GGN accounts for the Hessian's value when ``|ggn/x / hessian/x - 1| <= SHARE``."""
LAYER = re.compile(r"^hessian/layer/(?P<block>.+)/lambda_1$")


def title(th: Thresholds) -> str:
    return f"## GGN share of λ1 and of the trace (holds: within {SHARE:g} of 1), and the layer carrying λ1"


def _seeds(sub: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    ok = sub
    for c in cols:
        ok = ok[counted(ok, c) & ok[c].notna()]
    return ok.sort_values("seed")


def _share(sub: pd.DataFrame, what: str, th: Thresholds) -> dict:
    num, den = f"ggn/{what}", f"hessian/{what}"
    ok = _seeds(sub, [num, den])
    shares = [float(a) / float(b) for a, b in zip(ok[num], ok[den], strict=True)]
    per_seed = "; ".join(f"seed {s}: {v:.3f}" for s, v in zip(ok["seed"], shares, strict=True))
    if len(shares) < th.min_seeds:
        verdict, reason = "untestable", f"{len(shares)} seeds with both values (< {th.min_seeds})"
    elif all(abs(v - 1) <= SHARE for v in shares):
        verdict, reason = "holds", f"the GGN gives the Hessian's {what} within {SHARE:g} in every seed"
    elif all(abs(v - 1) > SHARE for v in shares):
        verdict, reason = (
            "fails",
            f"the GGN's {what} is off the Hessian's by more than {SHARE:g} in every seed",
        )
    else:
        verdict, reason = "mixed", "within the band in some seeds only"
    return {"verdict": verdict, "reason": reason, "per_seed": per_seed, "n_seeds": len(shares),
            "values": ", ".join(f"{v:.3f}" for v in shares), "column": num}  # fmt: skip


def _top_layer(sub: pd.DataFrame, layer_cols: list[str], th: Thresholds) -> dict:
    ok = _seeds(sub, ["hessian/lambda_1"])
    tops = []
    for _, run in ok.iterrows():
        values = {LAYER.match(c)["block"]: run[c] for c in layer_cols if pd.notna(run[c])}
        if values:
            block = max(values, key=values.get)
            tops.append((run["seed"], block, values[block] / run["hessian/lambda_1"]))
    per_seed = "; ".join(f"seed {s}: {b} ({v:.2f} of λ1)" for s, b, v in tops)
    names = {b for _, b, _ in tops}
    if len(tops) < th.min_seeds:
        verdict, reason = "untestable", f"{len(tops)} seeds with per-layer values (< {th.min_seeds})"
    elif len(names) == 1:
        verdict, reason = names.pop(), "the same layer in every seed"
    else:
        verdict, reason = "mixed", "the seeds disagree"
    return {"verdict": verdict, "reason": reason, "per_seed": per_seed, "n_seeds": len(tops)}


def verdicts(df: pd.DataFrame, th: Thresholds) -> tuple[list[dict], list[str]]:
    has_ggn = {"ggn/lambda_1", "hessian/lambda_1"} <= set(df.columns)
    layer_cols = sorted(c for c in df.columns if LAYER.match(c))
    if not has_ggn and not layer_cols:
        return [], []
    rows: list[dict] = []
    keys = ["lr_rule", "momentum", "training", "batch_size"]
    for fixed, cell in cells(df, keys):
        sub = completed(df, cell)
        base = {"kind": KIND, **fixed}
        if has_ggn:
            for what in ("lambda_1", "trace"):
                if f"ggn/{what}" in df and f"hessian/{what}" in df:
                    row = base | {
                        "metric": f"ggn_share {what}",
                        "expected": "holds",
                        "measure": "ggn/hessian",
                    }
                    rows.append(row | _share(sub, what, th))
        if layer_cols:
            row = base | {
                "metric": "top_layer lambda_1",
                "measure": "argmax block λ1",
                "column": "hessian/layer/*",
            }
            rows.append(row | _top_layer(sub, layer_cols, th))
    return rows, []
