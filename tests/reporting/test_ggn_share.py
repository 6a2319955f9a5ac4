"""The GGN-share verdicts on a synthetic runs table: holds / fails / mixed / untestable, and the top layer."""

from __future__ import annotations

import pandas as pd

from reporting.verdicts import STUDIES, Thresholds, ggn_share, verdicts


def runs(rows):
    base = {
        "status": "completed",
        "lr_rule": "fixed",
        "momentum": 0.9,
        "training": "natural",
        "activation": "relu",  # (tidy gives every run one)
        "test/acc": 0.9,
    }
    return pd.DataFrame([base | r for r in rows])


def test_shares_and_top_layer():
    df = runs(
        [
            {"batch_size": 32, "seed": 0, "hessian/lambda_1": 10.0, "ggn/lambda_1": 9.5, "hessian/trace": 50.0,
             "ggn/trace": 30.0, "hessian/layer/conv1/lambda_1": 2.0, "hessian/layer/fc3/lambda_1": 8.0},
            {"batch_size": 32, "seed": 1, "hessian/lambda_1": 12.0, "ggn/lambda_1": 11.9, "hessian/trace": 60.0,
             "ggn/trace": 58.0, "hessian/layer/conv1/lambda_1": 1.0, "hessian/layer/fc3/lambda_1": 9.0},
            {"batch_size": 512, "seed": 0, "hessian/lambda_1": 40.0, "ggn/lambda_1": 20.0, "hessian/trace": 90.0,
             "ggn/trace": 40.0, "hessian/layer/conv1/lambda_1": 30.0, "hessian/layer/fc3/lambda_1": 9.0},
        ]
    )  # fmt: skip
    rows, _ = ggn_share.verdicts(df, Thresholds())
    got = {(r["batch_size"], r["metric"]): r for r in rows}
    assert got[(32, "ggn_share lambda_1")]["verdict"] == "holds"
    assert got[(32, "ggn_share trace")]["verdict"] == "mixed"  # 0.6 and 0.97
    assert got[(32, "top_layer lambda_1")]["verdict"] == "fc3"
    assert got[(512, "ggn_share lambda_1")]["verdict"] == "untestable"  # one seed
    one = {(r["batch_size"], r["metric"]): r for r in ggn_share.verdicts(df, Thresholds(min_seeds=1))[0]}
    assert one[(512, "ggn_share lambda_1")]["verdict"] == "fails"
    assert one[(512, "top_layer lambda_1")]["verdict"] == "conv1"
    assert "0.75 of λ1" in one[(512, "top_layer lambda_1")]["per_seed"]
    assert ggn_share in STUDIES
    table, _ = verdicts(df, Thresholds(min_seeds=1))
    assert (table["kind"] == "ggn_share").sum() == 6


def test_runs_without_ggn_or_layers_give_no_rows():
    assert ggn_share.verdicts(
        runs([{"batch_size": 32, "seed": 0, "hessian/lambda_1": 1.0}]), Thresholds()
    ) == ([], [])
