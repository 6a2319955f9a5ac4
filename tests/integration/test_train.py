"""train.py end to end, as a user runs it: embedded data, resume, DDP equality, failures, W&B."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import NO_MEASURE, ROOT, records, run_train

pytestmark = pytest.mark.slow


def test_embedded_run_end_to_end_then_rerun_is_skipped(tmp_path):
    proc = run_train([*NO_MEASURE, "trainer.max_epochs=2"], tmp_path)
    ((name, rec),) = records(tmp_path).items()
    job = tmp_path / "runs" / name
    assert rec["status"] == "completed" and rec["stop_reason"] == "max_epochs"
    final = rec["final"]
    assert final["test/acc"] > 0.3 and final["train_eval/acc"] > 0.3  # chance is 0.1
    assert abs(final["gen_gap/acc"] - (final["train_eval/acc"] - final["test/acc"])) < 1e-6
    epochs = sorted({row["epoch"] for row in rec["history"] if "train/loss" in row})
    assert epochs == [0, 1]
    assert rec["batch_plan"]["global_batch"] == 128 and rec["provenance"]["torch"] == torch.__version__
    assert (job / "checkpoints" / "last.ckpt").exists() and list(job.glob("checkpoints/best-*.ckpt"))
    assert (job / ".hydra" / "config.yaml").exists()
    assert "test loss" in proc.stdout and str(job) in proc.stdout
    again = run_train([*NO_MEASURE, "trainer.max_epochs=2"], tmp_path)
    assert "already finished" in again.stdout and "Epoch" not in again.stderr


def test_resume_after_interruption_continues_the_step_count(tmp_path):
    args = [*NO_MEASURE, "trainer.max_epochs=4", "model=mlp"]
    env = {"SGD_LOG_DIR": str(tmp_path), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**__import__("os").environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.rglob("last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    ckpt = next(tmp_path.rglob("last.ckpt"))
    steps_before = torch.load(ckpt, weights_only=False)["global_step"]
    (rec,) = records(tmp_path).values()
    assert rec["status"] == "running" and 0 < steps_before < 4 * 32
    out = run_train(args, tmp_path)
    assert "resuming from" in out.stdout
    (rec,) = records(tmp_path).values()
    assert rec["status"] == "completed" and rec["resumed_from"].endswith("last.ckpt")
    assert rec["stopped_at_step"] == 4 * 32  # 4000 digits / 128 = 32 steps per epoch
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4 * 32


def _one_step(tmp_path, extra):
    args = [
        *NO_MEASURE,
        "model=mlp",
        "optimizer.momentum=0",
        "optimizer.lr=0.1",
        "optimizer.batch_size=64",
        "trainer.max_steps=1",
        "trainer.precision=64-true",
        *extra,
    ]  # float64: compare steps to 1e-6
    run_train(args, tmp_path)
    (rec,) = records(tmp_path).values()
    state = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)["state_dict"]
    return rec, {k: v for k, v in state.items() if k.startswith("net.body")}


def test_same_global_batch_same_first_step_on_one_and_two_processes(tmp_path):
    """Global batch 64: one process, two processes of 32, and one process accumulating 4 x 16."""
    torch.manual_seed(0)
    rec1, after1 = _one_step(tmp_path / "one", [])
    rec2, after2 = _one_step(tmp_path / "two", ["trainer=ddp_spawn", "trainer.devices=2"])
    rec3, after3 = _one_step(tmp_path / "accumulate", ["max_micro_batch=16"])
    assert rec2["batch_plan"]["per_device"] == 32 and rec2["batch_plan"]["world_size"] == 2
    assert rec3["batch_plan"]["micro_batch"] == 16 and rec3["batch_plan"]["accumulate"] == 4
    assert rec1["stop_reason"] == rec2["stop_reason"] == rec3["stop_reason"] == "max_steps"
    assert rec1["stopped_at_step"] == rec3["stopped_at_step"] == 1
    loss1, loss2, loss3 = (r["last"]["train/loss"] for r in (rec1, rec2, rec3))
    assert abs(loss1 - loss2) <= 1e-6 * abs(loss1) and abs(loss1 - loss3) <= 1e-6 * abs(loss1)
    from lightning_modules.models import mlp

    torch.manual_seed(0)  # train.py seeds the initial weights with seed=0
    net = mlp((1, 28, 28), 10).double()
    before = {f"net.{k}": v for k, v in net.state_dict().items() if k.startswith("body")}
    for k in after1:
        step1, step2, step3 = (
            before[k] - after1[k],
            before[k] - after2[k],
            before[k] - after3[k],
        )  # lr * gradient
        assert step1.abs().max() > 0
        assert (step1 - step2).norm() <= 1e-6 * step1.norm(), k
        assert (step1 - step3).norm() <= 1e-6 * step1.norm(), k


def test_training_stops_at_the_target_train_accuracy(tmp_path):
    run_train(
        [*NO_MEASURE, "callbacks.training_target.target_train_acc=0.6", "trainer.max_epochs=10"], tmp_path
    )
    (rec,) = records(tmp_path).values()
    assert rec["stop_reason"] == "target_train_acc" and rec["stopped_at_epoch"] < 10
    epochs = [row for row in rec["history"] if "train_eval/acc" in row and "train/loss" not in row]
    # the history's rows are the epochs' validations (the final evaluation is in "final", not a row)
    assert (
        epochs[-1]["train_eval/acc"] >= 0.6 > max((row["train_eval/acc"] for row in epochs[:-1]), default=0.0)
    )
    assert rec["final"]["train_eval/acc"] == epochs[-1]["train_eval/acc"]  # the same weights


def test_divergence_is_recorded_and_exits_zero(tmp_path):
    run_train([*NO_MEASURE, "optimizer.lr=1e6", "trainer.max_epochs=3"], tmp_path)
    (rec,) = records(tmp_path).values()
    assert rec["status"] == "diverged" and rec["stop_reason"] == "diverged"
    assert rec["stopped_at_step"] < 3 * 32


def test_multirun_bad_grid_point_fails_alone(tmp_path):
    proc = run_train(
        ["-m", *NO_MEASURE, "optimizer.lr=0.01,-1", "trainer.max_steps=2"], tmp_path, check=False
    )
    assert proc.returncode == 1
    recs = records(tmp_path)
    status = {name.split("optimizer.lr=")[1].split(",")[0]: r["status"] for name, r in recs.items()}
    assert status == {"0.01": "completed", "-1": "failed"}
    failed = next(r for r in recs.values() if r["status"] == "failed")
    assert "optimizer.lr=-1" in failed["error"] and "optimizer.lr=-1 is invalid" in proc.stderr


def test_wandb_offline_one_run_per_job_and_resume_continues_it(tmp_path):
    env = {"WANDB_MODE": "offline"}
    args = [
        "-m",
        "logger=wandb",
        "trainer.enable_progress_bar=false",
        "optimizer.lr=0.01,0.02",
        "trainer.max_steps=2",
        *[
            "model=mlp",
            "threads=1",
            "~callbacks.hessian",
            "~callbacks.adversarial",
        ],  # W&B only: no measurements
    ]
    run_train(args, tmp_path, env=env)
    job_dirs = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert len(job_dirs) == 2
    ids = []
    for job in job_dirs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        ids.append(runs[0].name.rsplit("-", 1)[1])
    assert ids[0] != ids[1]
    # interrupt-and-resume one job: it continues the same W&B run id
    rec_path = job_dirs[0] / "results.json"
    rec = json.loads(rec_path.read_text())
    rec["status"] = "running"
    rec_path.write_text(json.dumps(rec))
    out = run_train(args, tmp_path, env=env)
    assert "resuming from" in out.stdout
    resumed = list((job_dirs[0] / "wandb").glob("offline-run-*"))
    assert len(resumed) == 2 and {r.name.rsplit("-", 1)[1] for r in resumed} == {ids[0]}
    assert len(list((job_dirs[1] / "wandb").glob("offline-run-*"))) == 1  # finished job skipped
    assert re.search(r"already finished", out.stdout)


def test_wandb_without_credentials_runs_offline_and_says_how_to_sync(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc with a W&B key
    args = [sys.executable, str(ROOT / "train.py"), "logger=wandb", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", "~callbacks.hessian", "~callbacks.adversarial"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env={**env, "SGD_LOG_DIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logging offline" in proc.stdout and "wandb sync" in proc.stdout
    assert len(list(tmp_path.rglob("offline-run-*"))) == 1
