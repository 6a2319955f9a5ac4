"""What a job's W&B run is given (lifecycle/wandb_run.py), without W&B: history, summary, groups."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lifecycle import wandb_run
from lifecycle.wandb_run import History, group_of, settings_of, summary_of

CONFIG = {"optimizer": {"batch_size": 128, "momentum": 0.9, "lr": 0.01, "lr_rule": "fixed"}, "seed": 0}


def epoch_row(epoch, **values):
    return {**values, "epoch": epoch}


def test_measurements_are_charted_at_once_settings_and_counts_are_held_until_they_change():
    h = History(settings_of(wandb_run.config_of(CONFIG)))
    first = h.add(
        epoch_row(0, **{"train/loss": 2.3, "adv/eps0.3": 0.0, "opt/momentum": 0.8999999761581421,
                        "opt/batch_size": 128.0, "adv/n_samples": 50.0, "opt/lr": 0.01, "x/flag": 1.0}),
        31,
    )  # fmt: skip
    # measurements (even a flat 0 or 1) go on the epoch axis from their first value
    assert first.define == ["train/loss", "adv/eps0.3", "x/flag"]
    assert first.rows == [({"train/loss": 2.3, "adv/eps0.3": 0.0, "x/flag": 1.0, "epoch": 0}, 31)]
    # settings (a config value, to float32 precision) and counts go to the summary only
    assert {"opt/momentum", "opt/batch_size", "adv/n_samples", "opt/lr"} <= set(first.summary)
    second = h.add(epoch_row(1, **{"train/loss": 1.0, "opt/batch_size": 128.0, "opt/lr": 0.005}), 63)
    # the scheduled lr changed: charted now, with its first epoch; the batch size stays a constant
    assert second.define == ["opt/lr"]
    assert second.rows == [
        ({"opt/lr": 0.01, "epoch": 0}, 31),
        ({"train/loss": 1.0, "opt/lr": 0.005, "epoch": 1}, 63),
    ]
    assert set(h.constants()) == {"opt/momentum", "opt/batch_size", "adv/n_samples"}
    assert "opt/batch_size" not in {k for row, _ in first.rows + second.rows for k in row}


def test_per_step_values_pass_through_on_the_step_axis_and_best_values_are_kept():
    h = History()
    step = h.add({"train/loss_step": 2.3, "epoch": 0}, 9)
    assert step.define == [] and step.rows == [({"train/loss_step": 2.3, "epoch": 0}, 9)]
    h.add(epoch_row(0, **{"val/acc": 0.5, "val/loss": 1.0, "gen_gap/acc": 0.1}), 31)
    h.add(epoch_row(1, **{"val/acc": 0.7, "val/loss": 1.2}), 63)
    h.add(epoch_row(2, **{"val/acc": 0.6, "val/loss": float("nan")}), 95)
    assert h.best_summary() == {
        "best/val/acc": 0.7, "best_epoch/val/acc": 1.0, "best/val/loss": 1.0, "best_epoch/val/loss": 0.0,
    }  # fmt: skip


def test_summary_is_the_records_final_as_plain_numbers_with_how_the_run_ended():
    record = {
        "status": "completed",
        "stop_reason": "target_train_acc",
        "stopped_at_epoch": 3,
        "stopped_at_step": 96,
        "wall_time_s": 12.5,
        "segments": [{}, {}],
        "time_split": {"training": 10.0, "hessian": 2.5},
        "history": [{"step": 31, "epoch": 0, "val/acc": 0.4}, {"step": 63, "epoch": 1, "val/acc": 0.8}],
        "final": {"val/acc": 0.79, "hessian/lambda_1": 12.0, "train/loss": "nan"},
    }
    s = summary_of(record)
    assert s["val/acc"] == 0.79 and s["hessian/lambda_1"] == 12.0 and s["train/loss"] == "nan"
    assert (s["status"], s["stop_reason"], s["reached_target"]) == ("completed", "target_train_acc", True)
    assert (s["epochs"], s["steps"], s["segments"], s["wall_time_s"]) == (3, 96, 2, 12.5)
    assert (s["time/training"], s["time/hessian"]) == (10.0, 2.5)
    assert (s["best/val/acc"], s["best_epoch/val/acc"]) == (0.8, 1.0)
    # one definition with the report (lifecycle.record.reached_target): short of a configured target
    # is False; a run with no target had nothing to reach, so the summary holds no reached_target
    with_target = {**record, "config": {"callbacks": {"training_target": {"target_train_acc": 0.99}}}}
    assert summary_of({**with_target, "stop_reason": "max_epochs"})["reached_target"] is False
    assert "reached_target" not in summary_of({**record, "stop_reason": "max_epochs"})
    assert json.dumps(s, allow_nan=False)  # plain values only: no nested {"last": ...}, no NaN


def test_the_seeds_of_one_grid_point_share_a_group_and_other_points_do_not():
    exclude = ["threads", "logger"]
    a0 = group_of(
        "fixed_lr_small",
        ["experiment=fixed_lr_small", "optimizer.batch_size=32", "seed=0", "threads=1"],
        exclude,
    )
    a1 = group_of(
        "fixed_lr_small", ["seed=1", "optimizer.batch_size=32", "experiment=fixed_lr_small"], exclude
    )
    b0 = group_of(
        "fixed_lr_small", ["experiment=fixed_lr_small", "optimizer.batch_size=128", "seed=0"], exclude
    )
    assert a0 == a1 == "fixed_lr_small/optimizer.batch_size=32"
    # what does not change the training (a logger's settings, paths) does not split a group
    assert (
        group_of("e", ["logger.wandb.log_model=true", "paths.log_dir=/x", "model=mlp"], exclude)
        == "e/model=mlp"
    )
    assert b0 == "fixed_lr_small/optimizer.batch_size=128"
    assert group_of("adhoc", ["seed=3"]) == "adhoc"
    long = group_of("e", [f"+k{i}=" + "v" * 20 for i in range(10)])
    assert len(long) <= 128 and long != group_of("e", [f"+k{i}=" + "v" * 20 for i in range(11)])


def test_rows_from_the_record_and_the_csv_log_in_logging_order_before_a_checkpoint(tmp_path):
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/acc\n0,9,2.0,\n0,31,,0.5\n1,39,1.0,\n1,63,,0.6\n"
    )
    record = {"history": [{"step": 31, "epoch": 0, "val/acc": 0.5}, {"step": 63, "epoch": 1, "val/acc": 0.6}]}
    rows = wandb_run.job_rows(tmp_path, record)
    assert [(sorted(r), s) for r, s in rows] == [
        (["epoch", "train/loss_step"], 9), (["epoch", "val/acc"], 31),
        (["epoch", "train/loss_step"], 39), (["epoch", "val/acc"], 63),
    ]  # fmt: skip
    # a checkpoint after 32 steps has seen the rows logged at steps < 32 (step s - 1 after s steps)
    assert [s for _, s in wandb_run.job_rows(tmp_path, record, before_step=32)] == [9, 31]


def test_a_run_given_a_record_is_not_sent_again_until_the_record_changes(tmp_path):
    record = {"status": "completed", "final": {"val/acc": 0.9}, "history": [], "config": CONFIG}
    assert wandb_run.already_sent(tmp_path, record) is None
    run = SimpleNamespace(
        id="abc", dir=str(tmp_path / "wandb/offline-run-x/files"), settings=SimpleNamespace(mode="offline")
    )
    wandb_run.mark_sent(tmp_path, record, run)
    assert wandb_run.already_sent(tmp_path, record)["run_id"] == "abc"
    assert wandb_run.already_sent(tmp_path, {**record, "final": {"val/acc": 0.8}}) is None
    disabled = SimpleNamespace(id="d", dir=None, settings=SimpleNamespace(mode="disabled"))
    wandb_run.mark_sent(tmp_path / "other", record, disabled)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "value,expected", [(128.0, True), (50.0, True), (1.0, False), (0.37, False), (0.9, True)]
)
def test_could_be_constant(value, expected):
    assert (
        wandb_run.could_be_constant("opt/momentum" if value == 0.9 else "x/y", value, settings_of(CONFIG))
        is expected
    )


def test_summary_names_the_unconverged_measurements_and_the_history_keeps_the_flag():
    record = {
        "status": "completed",
        "history": [{"step": 9, "epoch": 0, "hessian/converged": 0.0, "hessian/lambda_1": 1e-4}],
        "unconverged": [{"step": 9, "epoch": 0, "prefix": "hessian", "rel_error": 209.0}],
        "final": {"hessian/converged": 1.0, "adv/converged": 0.0, "hessian/lambda_1": 1.0},
    }
    assert summary_of(record)["unconverged"] == "adv,hessian"
    assert "unconverged" not in summary_of({**record, "unconverged": [], "final": {"hessian/converged": 1.0}})
    history = History(settings_of({"callbacks": {"hessian": {"tol": 1e-4, "max_iter": 100}}}))
    (row, _), *_ = history.add({"epoch": 0, "hessian/converged": 0.0}, 9).rows
    assert row["hessian/converged"] == 0.0
    (row, _), *_ = history.add({"epoch": 1, "hessian/converged": 1.0}, 19).rows
    assert row["hessian/converged"] == 1.0
