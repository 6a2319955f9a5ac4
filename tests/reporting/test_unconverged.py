"""A run whose final measurement did not converge: named in runs.csv, listed in unconverged.csv,
its values of that measurement drawn hollow and left out of means and verdicts (the run's other
values still count)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from reporting import figures, pipeline
from tests.test_report import TRENDS, record, trend_records, verdict, write

LABEL = "lr_rule=fixed, momentum=0.9"


def sweep_with_an_unconverged_run(tmp_path):
    """TRENDS plus a third seed of (fixed, 0.9) whose λ1 at B=512 did not converge (and is absurd)."""
    bad = record(512, 2, 1000.0, 0.91)
    bad["final"]["hessian/converged"] = 0.0
    bad["unconverged"] = [{"step": 99, "epoch": 9, "prefix": "hessian", "rel_error": 0.2}]
    recs = [*trend_records(), record(32, 2, 11.0, 0.95), bad]
    for r in recs:
        r["final"].setdefault("hessian/converged", 1.0)
    return write(tmp_path / "sweep", recs)


def test_an_unconverged_measurement_is_listed_drawn_hollow_and_left_out(tmp_path):
    out = tmp_path / "out"
    df, notes = pipeline.report(sweep_with_an_unconverged_run(tmp_path), out)

    csv = pd.read_csv(out / "runs.csv")
    assert "unconverged" in csv
    flagged = csv[csv["unconverged"].notna()]
    assert flagged[["batch_size", "seed", "unconverged"]].values.tolist() == [[512, 2, "hessian"]]
    assert flagged["hessian/lambda_1"].tolist() == [1000.0]  # the value is kept, never averaged

    listed = pd.read_csv(out / "unconverged.csv")
    assert listed[["prefix", "step", "epoch", "rel_error", "batch_size", "seed"]].values.tolist() == [
        ["hessian", 99, 9, 0.2, 512, 2]
    ]
    (note,) = [n for n in notes if "did not converge" in n]
    assert "unconverged.csv" in note and "(hessian, relative error 0.2)" in note
    assert note in (out / "verdicts.md").read_text()

    table = pd.read_csv(out / "verdicts.csv")
    lam = verdict(table, "batch_size", "lambda_1", lr_rule="fixed", momentum=0.9)
    assert "seed 2" not in lam["per_seed"] and "1000" not in lam["per_seed"]
    assert (lam["n_seeds"], lam["verdict"], lam["seeds_at_target"]) == (2, "rises", "B=32: 3; B=512: 2")
    acc = verdict(table, "batch_size", "test_acc", lr_rule="fixed", momentum=0.9)
    assert acc["n_seeds"] == 3 and "seed 2: 95.0 -> 91.0" in acc["per_seed"]  # its accuracy still counts

    fig, ax = plt.subplots()
    figures.plot_vs_batch(ax, df[df["status"] == "completed"], "hessian/lambda_1", "λ1")
    (mean,) = [c.lines[0] for c in ax.containers if c.get_label() == LABEL]
    seeds = TRENDS[("fixed", 0.9)]
    assert list(mean.get_ydata()) == [(10.0 + 12.0 + 11.0) / 3, sum(s[1] for s in seeds) / 2]
    (hollow,) = [line for line in ax.lines if line.get_label() == f"unconverged, {LABEL}"]
    assert hollow.get_markerfacecolor() == "none" and hollow.get_linestyle() == "None"
    assert (list(hollow.get_xdata()), list(hollow.get_ydata())) == ([512], [1000.0])
    plt.close(fig)
    fig, ax = plt.subplots()  # the run's test accuracy converged: in the mean, not hollow
    figures.plot_vs_batch(ax, df[df["status"] == "completed"], "test/acc", "test acc")
    assert not [line for line in ax.lines if line.get_label().startswith("unconverged")]
    plt.close(fig)
    assert (out / "eigenvalue_vs_batch.png").stat().st_size > 10_000
