"""The report (``report.py``, :mod:`reporting`) on synthetic records (no training): convergence,
eos_ratio, verdicts, worst-case gap."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import report
from reporting import figures, pipeline, runs
from reporting import verdicts as vd


def record(
    b,
    seed,
    lam,
    acc,
    *,
    rule="fixed",
    momentum=0.9,
    adversarial=False,
    stop="target_train_acc",
    target=0.97,
    lr=0.01,
    ratio=7.8125e-05,
    adv=None,
    status="completed",
):
    """A finished job's record as the lifecycle writes it, with only what the report reads."""
    final = {"train_eval/acc": 0.98 if stop.startswith("target") else 0.6, "train_eval/loss": 0.1}
    final |= {"test/acc": acc, "hessian/lambda_1": lam, **(adv or {})}
    return {
        "status": status,
        "stop_reason": stop,
        "config": {
            "seed": seed,
            "optimizer": {
                "batch_size": b,
                "lr_rule": rule,
                "lr": lr,
                "lr_ratio": ratio,
                "momentum": momentum,
            },
            "adversarial_training": {"enabled": adversarial},
            "callbacks": {"training_target": {"target_train_acc": target, "target_train_loss": None}},
        },
        "final": final,
        "identity": {"training": {}, "measurement": {}, "code": "synthetic"},  # a finished record has these
        "wall_time_s": 1.0,
    }


def write(sweep, recs):
    for i, r in enumerate(recs):
        (sweep / f"{i}").mkdir(parents=True)
        (sweep / f"{i}" / "results.json").write_text(json.dumps(r))
    return sweep


def frame(recs, **kw):
    return runs.tidy([r | {"job": f"job{i}", "dir": "."} for i, r in enumerate(recs)], **kw)


def test_reached_target_eos_ratio_and_lr_limited_by_hand():
    df = frame(
        [
            record(32, 0, 300.0, 0.9),  # λ1·lr/(2(1+β)) = 300·0.01/3.8
            record(32, 1, 300.0, 0.9, stop="target_train_loss"),
            record(32, 2, 300.0, 0.9, stop="max_epochs"),
            record(32, 3, 300.0, 0.9, stop="max_epochs", target=None),  # no target configured
            record(256, 0, 100.0, 0.9, rule="ratio", momentum=0.0, ratio=1e-4),  # lr 0.0256: 100·0.0256/2
        ],
        eos_threshold=0.7,
    )
    assert df["reached_target"].tolist()[:3] == [True, True, False]
    assert pd.isna(df["reached_target"].iloc[3]) and pd.isna(df["target"].iloc[3])  # no target: empty
    assert runs.at_target(df).tolist() == [True, True, False, True, True]
    assert df["target"].tolist()[:3] == ["train acc >= 0.97"] * 3
    assert df["eos_ratio"].iloc[0] == pytest.approx(300 * 0.01 / (2 * 1.9))
    assert df["eos_ratio"].iloc[4] == pytest.approx(100 * 1e-4 * 256 / 2)
    assert df["lr_limited"].tolist() == [True] * 5  # 0.789 and 1.28, both >= 0.7
    assert frame([record(32, 0, 300.0, 0.9)])["lr_limited"].tolist() == [False]  # 0.789 < 0.8 (default)
    assert math.isnan(frame([record(32, 0, math.nan, 0.9)])["eos_ratio"].iloc[0])


# per (lr rule, momentum): per seed (λ1 at B=32, at B=512, test acc at B=32, at B=512)
TRENDS = {
    ("fixed", 0.9): [(10.0, 20.0, 0.95, 0.90), (12.0, 36.0, 0.96, 0.93)],  # λ1 rises, acc falls (-5, -3 pts)
    ("ratio", 0.9): [(10.0, 11.0, 0.95, 0.94), (12.0, 10.0, 0.96, 0.97)],  # flat, flat (-1, +1 pts)
    ("fixed", 0.0): [(10.0, 5.0, 0.90, 0.95), (12.0, 6.0, 0.90, 0.93)],  # falls, rises (+5, +3 pts)
    ("ratio", 0.0): [(10.0, 20.0, 0.95, 0.90), (12.0, 6.0, 0.96, 0.99)],  # mixed, mixed (-5, +3 pts)
}


def trend_records(capped=()):
    recs = []
    for (rule, m), seeds in TRENDS.items():
        for seed, (l0, l1, a0, a1) in enumerate(seeds):
            for b, lam, acc in ((32, l0, a0), (512, l1, a1)):
                stop = "max_epochs" if (rule, m, b, seed) in capped else "target_train_acc"
                recs.append(record(b, seed, lam, acc, rule=rule, momentum=m, stop=stop))
    return recs


def verdict(table, kind, metric, **where):
    sel = (table["kind"] == kind) & (table["metric"] == metric)
    for k, v in where.items():
        sel &= table[k] == v
    (row,) = table[sel].to_dict("records")
    return row


def test_batch_size_verdicts_rise_flat_fall_mixed_and_accuracies_in_points():
    table, notes = vd.verdicts(frame(trend_records()))
    got = {
        (r, m): (verdict(table, "batch_size", "lambda_1", lr_rule=r, momentum=m)["verdict"],
                 verdict(table, "batch_size", "test_acc", lr_rule=r, momentum=m)["verdict"])
        for r, m in TRENDS
    }  # fmt: skip
    assert got == {
        ("fixed", 0.9): ("rises", "falls"),  # as ratios, 0.90/0.95 = 0.947 would be "flat": points are used
        ("ratio", 0.9): ("flat", "flat"),
        ("fixed", 0.0): ("falls", "rises"),
        ("ratio", 0.0): ("mixed", "mixed"),
    }
    row = verdict(table, "batch_size", "lambda_1", lr_rule="fixed", momentum=0.9)
    assert row["compared"] == "B=512 vs B=32" and row["n_seeds"] == 2 and row["expected"] == "rises"
    assert row["per_seed"] == "seed 0: 10 -> 20 (x2); seed 1: 12 -> 36 (x3)"
    acc = verdict(table, "batch_size", "test_acc", lr_rule="fixed", momentum=0.9)
    assert acc["measure"] == "points" and acc["values"] == "-5, -3"
    assert "seed 0: 95.0 -> 90.0 (-5.0 pts)" in acc["per_seed"]
    assert any("robust accuracy verdicts skipped: no robust accuracy at eps 0.1" in n for n in notes)


def test_a_ratio_on_the_threshold_rises_and_thresholds_are_options():
    recs = [record(b, s, lam, 0.9) for s in (0, 1) for b, lam in ((32, 10.0), (512, 15.0))]
    table, _ = vd.verdicts(frame(recs))
    assert verdict(table, "batch_size", "lambda_1")["verdict"] == "rises"  # r = 1.5 exactly
    table, _ = vd.verdicts(frame(recs), vd.Thresholds(ratio=2.0))
    assert verdict(table, "batch_size", "lambda_1")["verdict"] == "flat"


def test_a_capped_run_is_marked_left_out_of_means_and_verdicts_and_listed(tmp_path):
    capped = {("fixed", 0.9, 512, 1)}  # seed 1 at B=512 stopped at its epoch cap
    sweep = write(tmp_path / "sweep", trend_records(capped))
    df, notes = pipeline.report(sweep, tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert (~csv["reached_target"]).sum() == 1 and "eos_ratio" in csv and "lr_limited" in csv
    short = pd.read_csv(tmp_path / "out" / "not_at_target.csv")
    assert short[["batch_size", "lr_rule", "momentum", "seed", "stop_reason"]].values.tolist() == [
        [512, "fixed", 0.9, 1, "max_epochs"]
    ]
    (note,) = [n for n in notes if "short of the training target" in n]
    assert note.startswith("1 completed run stopped short") and "(max_epochs, train acc 0.6)" in note
    table = pd.read_csv(tmp_path / "out" / "verdicts.csv")
    row = verdict(table, "batch_size", "lambda_1", lr_rule="fixed", momentum=0.9)
    assert row["verdict"] == "untestable" and row["reason"] == "B=512: 1 seed at target (need 2)"
    assert verdict(table, "batch_size", "lambda_1", lr_rule="ratio", momentum=0.9)["verdict"] == "flat"
    md = (tmp_path / "out" / "verdicts.md").read_text()
    assert "ratio 1.5" in md and "points 2" in md and "at least 2 seeds" in md and "eos_ratio" in md
    assert "seed 0: 10 -> 20 (x2)" in md and "max_epochs" in md

    fig, ax = plt.subplots()  # the figure: the mean of B=512 is seed 0's λ1 only, seed 1 a hollow square
    figures.plot_vs_batch(ax, df[df["status"] == "completed"], "hessian/lambda_1", "λ1", threshold=True)
    lines = {line.get_label(): line for line in ax.lines}
    label = "lr_rule=fixed, momentum=0.9"
    (mean,) = [c.lines[0] for c in ax.containers if c.get_label() == label]  # the errorbar's line
    assert list(mean.get_xdata()) == [32, 512] and list(mean.get_ydata()) == [
        11.0,
        20.0,
    ]  # (10 + 12) / 2 at B=32; 20, not (20 + 36) / 2
    hollow = lines[f"not at target, {label}"]
    assert hollow.get_markerfacecolor() == "none" and hollow.get_linestyle() == "None"
    assert list(hollow.get_xdata()) == [512] and list(hollow.get_ydata()) == [36.0]
    assert list(lines[f"2(1+β)/lr, {label}"].get_ydata()) == pytest.approx([380.0, 380.0])
    plt.close(fig)
    assert (tmp_path / "out" / "eigenvalue_vs_batch.png").stat().st_size > 10_000


def test_momentum_and_training_verdicts_per_batch_size_and_seed():
    recs = []
    for seed, (acc0, acc9) in enumerate(((0.90, 0.95), (0.91, 0.94))):  # momentum: +5, +3 points at B=32
        recs += [record(32, seed, 10.0, acc0, momentum=0.0), record(32, seed, 10.0, acc9, momentum=0.9)]
    for seed, (nat, adv) in enumerate(((20.0, 5.0), (30.0, 10.0))):  # adversarial/natural: x0.25, x0.33
        recs += [record(64, seed, nat, 0.9), record(64, seed, adv, 0.9, adversarial=True)]
    for seed in (0, 1):  # B=128: seed 1 without momentum stopped at its cap
        stop = "max_steps" if seed else "target_train_acc"
        recs += [record(128, seed, 10.0, 0.9, momentum=0.0, stop=stop), record(128, seed, 10.0, 0.9)]
    table, _ = vd.verdicts(frame(recs))
    acc = verdict(table, "momentum", "test_acc", batch_size=32)
    assert (acc["verdict"], acc["compared"], acc["values"]) == ("rises", "β=0.9 vs β=0", "5, 3")
    assert verdict(table, "momentum", "lambda_1", batch_size=32)["verdict"] == "flat"
    capped = verdict(table, "momentum", "test_acc", batch_size=128)
    assert (capped["verdict"], capped["reason"]) == ("untestable", "β=0: 1 seed at target (need 2)")
    # rows only where the grid has both sides: no momentum pair at B=64, no adversarial run at 32, 128
    assert set(table.loc[table["kind"] == "momentum", "batch_size"]) == {32, 128}
    adv = verdict(table, "training", "lambda_1")
    assert (adv["batch_size"], adv["verdict"], adv["compared"]) == (64, "falls", "adversarial vs natural")
    assert (
        adv["per_seed"] == "seed 0: 20 -> 5 (x0.25); seed 1: 30 -> 10 (x0.333)" and adv["expected"] == "falls"
    )
    table, _ = vd.verdicts(frame(recs), vd.Thresholds(momenta=(0.0, 0.5)))
    assert "momentum" not in set(table["kind"])  # no run has momentum 0.5


def test_robust_accuracy_prefers_autoattack_then_worst_then_pgd_at_the_chosen_eps():
    df = pd.DataFrame(columns=["adv/pgd_linf/eps0.1", "adv/worst_linf/eps0.1", "adv/autoattack_linf/eps0.05"])
    assert vd.robust_column(df, 0.1) == ("adv/worst_linf/eps0.1", "")
    assert vd.robust_column(df, 0.05) == ("adv/autoattack_linf/eps0.05", "")
    col, why = vd.robust_column(df, 0.3)
    assert col is None and "pgd_linf: eps 0.1" in why and "autoattack_linf: eps 0.05" in why
    recs = [
        record(b, s, 10.0, 0.9, adv={"adv/pgd_linf/eps0.1": pgd, "adv/autoattack_linf/eps0.1": aa})
        for s in (0, 1)
        for b, pgd, aa in ((32, 0.80, 0.70), (512, 0.75, 0.60))  # autoattack: -10 points; pgd: -5
    ]
    table, _ = vd.verdicts(frame(recs))
    row = verdict(table, "batch_size", "robust_acc")
    assert (row["column"], row["verdict"], row["values"]) == (
        "adv/autoattack_linf/eps0.1",
        "falls",
        "-10, -10",
    )
    table, _ = vd.verdicts(frame(recs), vd.Thresholds(points=10.5))
    assert verdict(table, "batch_size", "robust_acc")["verdict"] == "flat"


def test_worst_case_gap_per_eps_mean_and_max_and_skipped_without_autoattack():
    adv = [  # (pgd, autoattack) at eps 0.1 and 0.2
        {"adv/pgd_linf/eps0.1": 0.80, "adv/autoattack_linf/eps0.1": 0.78,
         "adv/pgd_linf/eps0.2": 0.40, "adv/autoattack_linf/eps0.2": 0.30},
        {"adv/pgd_linf/eps0.1": 0.70, "adv/autoattack_linf/eps0.1": 0.64,
         "adv/pgd_linf/eps0.2": 0.20, "adv/autoattack_linf/eps0.2": 0.20},
    ]  # fmt: skip
    df = frame([record(32, s, 10.0, 0.9, adv=a) for s, a in enumerate(adv)])
    gap = vd.worst_case_gap(df).set_index("eps")
    assert gap.loc[0.1, "gap_mean_points"] == pytest.approx(4.0) and gap.loc[
        0.1, "gap_max_points"
    ] == pytest.approx(6)
    assert gap.loc[0.2, "gap_mean_points"] == pytest.approx(5.0) and gap.loc[
        0.2, "gap_max_points"
    ] == pytest.approx(10)
    assert gap.loc[0.1, "gap_max_job"] == "job1" and gap.loc[0.2, "gap_max_job"] == "job0"
    assert list(gap["n_runs"]) == [2, 2]
    assert vd.worst_case_gap(frame([record(32, 0, 10.0, 0.9, adv={"adv/pgd_linf/eps0.1": 0.8})])) is None


def test_cli_thresholds_are_used_and_recorded_in_verdicts_md(tmp_path, capsys):
    adv = {"adv/pgd_linf/eps0.1": 0.8, "adv/autoattack_linf/eps0.1": 0.75}
    recs = [record(b, 0, lam, 0.9, adv=adv) for b, lam in ((32, 10.0), (512, 20.0))]  # one seed, x2
    sweep = write(tmp_path / "sweep", recs)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    assert verdict(pd.read_csv(out / "verdicts.csv"), "batch_size", "lambda_1")["verdict"] == "untestable"
    assert "no adv/autoattack" not in (out / "verdicts.md").read_text()
    assert pd.read_csv(out / "worst_case_gap.csv")["gap_mean_points"].tolist() == pytest.approx([5.0])
    argv = [
        str(sweep),
        "--out",
        str(out),
        "--min-seeds",
        "1",
        "--ratio-threshold",
        "2.5",
        "--eos-threshold",
        "0.5",
    ]
    assert (
        report.main([*argv, "--points-threshold", "3", "--robust-eps", "0.1", "--momenta", "0", "0.5"]) == 0
    )
    assert (
        verdict(pd.read_csv(out / "verdicts.csv"), "batch_size", "lambda_1")["verdict"] == "flat"
    )  # x2 < 2.5
    md = (out / "verdicts.md").read_text()
    for text in ("ratio 2.5", "points 3", "at least 1 seeds", "eps 0.1", "β=0.5 vs β=0", ">= 0.5."):
        assert text in md, text
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--ratio-threshold", "0.9"])
    assert "ratio threshold 0.9 must be > 1" in capsys.readouterr().err


def test_a_cell_with_no_run_at_target_is_untestable_not_an_error():
    """Every run of a cell capped (e.g. a one-epoch sweep with a 97% target): the comparison has no
    run left, and says so, instead of failing on the empty selection."""
    cell = pd.DataFrame(
        {
            "batch_size": [64, 256],
            "seed": [0, 0],
            "status": ["completed", "completed"],
            "reached_target": [False, False],
            "hessian/lambda_1": [10.0, 30.0],
        }
    )
    out = vd.compare(cell, "batch_size", 64, 256, "hessian/lambda_1", "ratio", vd.Thresholds())
    assert out["verdict"] == "untestable"
    reached = cell.assign(reached_target=True, seed=[0, 0])
    two = pd.concat(
        [reached, reached.assign(seed=1, **{"hessian/lambda_1": [10.0, 40.0]})], ignore_index=True
    )
    assert (
        vd.compare(two, "batch_size", 64, 256, "hessian/lambda_1", "ratio", vd.Thresholds())["verdict"]
        == "rises"
    )


def test_a_metric_no_run_logged_is_untestable_not_an_error():
    cell = pd.DataFrame({"batch_size": [64, 256], "seed": [0, 0], "status": ["completed"] * 2})
    out = vd.compare(cell, "batch_size", 64, 256, "hessian/lambda_1", "ratio", vd.Thresholds())
    assert out["verdict"] == "untestable"
