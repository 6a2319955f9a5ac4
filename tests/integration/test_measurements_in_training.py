"""The measurement callbacks inside real training runs: 1 vs 2 processes (``ddp_spawn``)."""

from __future__ import annotations

import csv

import pytest

from tests.helpers import records, run_train, wall_clock

pytestmark = pytest.mark.slow


# Keys of ``final`` that legitimately differ between 1 and 2 processes (everything else must agree):
NOT_COMPARED_ACROSS_WORLD_SIZES = {
    "opt/per_device_batch",  # world-size facts: 256 on one process, 128 on each of two
    "opt/micro_batch",
    "train/loss_step",  # rank 0's own micro-batch loss (logged per step, not reduced over ranks)
}


def _close(a: float, b: float) -> bool:
    """Equal up to float32 reductions summed in another order (the evaluation losses are float32
    torchmetrics sums over 2 shards instead of 1: ~1e-7 relative each). Losses and accuracies are
    O(1) and gen_gap/* are differences of O(1) values, hence the floor of 1 under the scale."""
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def test_trainer_logs_identical_measurements_on_one_and_two_processes(tmp_path):
    """ddp_spawn with 2 CPU processes vs 1: same logged hessian/... and adv/... values, and the same
    ``final`` record (every key but the world-size facts and wall-clock times).

    float64 training keeps the two runs' weights equal to ~1e-15 (the only difference is
    the order of the gradient sum), so the measurements must agree to 1e-6 relative and the
    attack counts exactly. The subset sizes are odd, so the ranks hold unequal shards. Two epochs:
    the final evaluation (``trainer.validate`` in a second pair of processes) must not carry
    anything over from the evaluations inside ``fit`` (it once averaged its losses with epoch 1's
    through metric states that ddp_spawn had put in shared memory), and it evaluates the last
    epoch's weights, so it equals the last history row. The 2-process run's CSV log and record
    keep the epochs' rows at their true step (the final evaluation neither deletes nor adds rows),
    with no flood of Lightning's sync_dist warnings for values that are the same on every rank."""
    args = ["logger=csv", "trainer.enable_progress_bar=false", "model=mlp", "trainer.max_epochs=2", "trainer.precision=64-true", "optimizer.batch_size=256",
            "callbacks.hessian.subset_size=301", "callbacks.hessian.batch_size=100", "callbacks.hessian.trace=true", "callbacks.hessian.smallest=true",
            "callbacks.adversarial.subset_size=151", "callbacks.adversarial.batch_size=64",
            "callbacks.adversarial.eps=[0,0.05,0.1]", "callbacks.hessian.hvp=double_backward"]  # fmt: skip
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

    # the final record: every key, 1 process vs 2
    compared = {k for k in {*one["final"], *two["final"]} if not wall_clock(k)}
    compared -= NOT_COMPARED_ACROSS_WORLD_SIZES
    assert {"val/loss", "test/loss", "train_eval/loss", "gen_gap/loss", "hessian/lambda_1"} <= compared
    only_one = sorted(k for k in compared if k not in two["final"])
    only_two = sorted(k for k in compared if k not in one["final"])
    assert not only_one and not only_two, f"final keys only on 1 process {only_one}, only on 2 {only_two}"
    differ = {
        k: (one["final"][k], two["final"][k])
        for k in sorted(compared)
        if not _close(one["final"][k], two["final"][k])
    }
    assert not differ, f"final differs between 1 and 2 processes (1, 2): {differ}"
    # the final model is the last epoch's: the final evaluation equals the last history row
    for name, rec in (("1 process", one), ("2 processes", two)):
        same_model = [k for k in rec["final"] if k in rec["last"] and not wall_clock(k)]
        assert "test/loss" in same_model and "hessian/lambda_1" in same_model
        stale = {
            k: (rec["final"][k], rec["last"][k])
            for k in same_model
            if not _close(rec["final"][k], rec["last"][k])
        }
        assert not stale, f"{name}: final differs from the last history row (final, last): {stale}"

    # measured at the measurement epochs (every 2: the second, the last), in the per-epoch history
    assert any("hessian/lambda_1" in row and row.get("epoch") == 1 for row in two["history"])
    steps = 16  # 4,000 digits / 256 per epoch
    rows_at = {(steps - 1, 0), (2 * steps - 1, 1)}
    assert {(row["step"], row["epoch"]) for row in two["history"]} == rows_at
    (metrics,) = (tmp_path / "two").rglob("csv/version_0/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("hessian/lambda_1") or r.get("val/acc")]
    assert rows and {(int(r["step"]), int(r["epoch"])) for r in rows} == rows_at
