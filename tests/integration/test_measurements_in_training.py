"""The measurement callbacks inside real training runs: 1 vs 2 processes (``ddp_spawn``)."""

from __future__ import annotations

import csv

import pytest

from tests.helpers import records, run_train

pytestmark = pytest.mark.slow


def test_trainer_logs_identical_measurements_on_one_and_two_processes(tmp_path):
    """ddp_spawn with 2 CPU processes vs 1: same logged hessian/... and adv/... values.

    float64 training keeps the two runs' weights equal to ~1e-15 (the only difference is
    the order of the gradient sum), so the measurements must agree to 1e-6 relative and the
    attack counts exactly. The subset sizes are odd, so the ranks hold unequal shards. The
    2-process run's CSV log and record keep the epoch's rows at their true step (the final
    evaluation, in a second pair of processes, neither deletes nor adds rows), with no flood of
    Lightning's sync_dist warnings for values that are the same on every rank."""
    args = ["logger=csv", "trainer.enable_progress_bar=false", "model=mlp", "trainer.max_epochs=1", "trainer.precision=64-true", "optimizer.batch_size=256",
            "callbacks.hessian.subset_size=301", "callbacks.hessian.batch_size=100", "callbacks.hessian.trace=true", "callbacks.hessian.smallest=true",
            "callbacks.adversarial.subset_size=151", "callbacks.adversarial.batch_size=64",
            "callbacks.adversarial.eps=[0,0.05,0.1]"]  # fmt: skip
    run_train(args, tmp_path / "one")
    spawned = run_train([*args, "trainer=ddp_spawn", "trainer.devices=2"], tmp_path / "two")
    assert "sync_dist=True" not in spawned.stderr
    (one,) = records(tmp_path / "one").values()
    (two,) = records(tmp_path / "two").values()
    assert two["batch_plan"]["world_size"] == 2
    for k in ("train/loss", "train/acc", "test/acc", "train_eval/loss"):  # training itself matched
        assert abs(one["last"][k] - two["last"][k]) <= 1e-6 * abs(one["last"][k]), k
    hess = [k for k in one["last"] if k.startswith("hessian/lambda") or k == "hessian/trace"]
    adv = [k for k in one["last"] if k.startswith("adv/") and k != "adv/seconds"]
    # clean, fgsm and pgd and their worst case at 3 eps, nested, n_samples, n_grad
    assert len(hess) == 5 and len(adv) == 13 and one["last"]["adv/nested"] == 1.0
    for k in hess:
        assert abs(one["last"][k] - two["last"][k]) <= 1e-6 * abs(one["last"]["hessian/lambda_1"]), k
    for k in adv:
        assert one["last"][k] == two["last"][k], k
    assert one["last"]["adv/n_samples"] == 151
    # measured at every epoch end: present in the per-epoch history, not only at the end
    assert any("hessian/lambda_1" in row and row.get("epoch") == 0 for row in two["history"])
    steps = 16  # 4,000 digits / 256
    assert {(row["step"], row["epoch"]) for row in two["history"]} == {(steps - 1, 0)}
    (metrics,) = (tmp_path / "two").rglob("csv/version_0/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("hessian/lambda_1") or r.get("val/acc")]
    assert rows and {(r["step"], r["epoch"]) for r in rows} == {(str(steps - 1), "0")}
