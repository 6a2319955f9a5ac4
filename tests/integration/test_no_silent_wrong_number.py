"""No silent wrong number in the job lifecycle: every bad value, refusal and failure is said as such.

Each test names the behaviour; each failed before the change it came with.
"""

from __future__ import annotations

import csv
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import NO_MEASURE, ROOT, records, run_train

pytestmark = pytest.mark.slow

SMALL = [*NO_MEASURE, "model=mlp", "threads=1"]


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "+optimizer.lrr=0.1",
            "optimizer.lrr=0.1 is invalid: not a setting of optimizer (allowed: batch_size, lr,",
        ),
        ("optimizer.weight_decay=abc", "optimizer.weight_decay='abc' is invalid: must be a number"),
    ],
)
def test_an_unknown_key_or_a_wrong_type_exits_2_with_one_message_naming_the_key(tmp_path, override, message):
    proc = run_train([*SMALL, "trainer.max_steps=2", override], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    ((_, rec),) = records(tmp_path).items()
    assert rec["status"] == "failed" and message in rec["error"]


def test_a_sweep_records_a_job_with_a_bad_value_as_failed_and_runs_the_next(tmp_path):
    proc = run_train(
        ["-m", *SMALL, "trainer.max_steps=2", "optimizer.weight_decay=abc,0.0"], tmp_path, check=False
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 job(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    status = {str(r["overrides"]): r["status"] for r in records(tmp_path).values()}
    assert sorted(status.values()) == ["completed", "failed"], status


def test_a_job_that_fails_after_its_budget_was_spent_says_failed_not_max_epochs(tmp_path):
    proc = run_train([*SMALL, "trainer.max_epochs=1", "fault=raise@final_measurement"], tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    ((_, rec),) = records(tmp_path).items()
    assert rec["status"] == "failed" and rec["stop_reason"] == "failed"
    assert "FaultInjection" in rec["error"]


def test_a_refused_second_launch_leaves_the_running_jobs_hydra_files_byte_identical(tmp_path):
    run_train([*SMALL, "trainer.max_steps=2", "fresh=true"], tmp_path)
    (job,) = (p.parent for p in tmp_path.rglob("results.json"))
    before = {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()}
    assert {"config.yaml", "overrides.yaml"} <= set(before)
    with open(job / "job.lock", "a+") as lock:  # this test process is "the running job"
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # threads=2 names the same job (not in its directory name) with other overrides
        second = run_train([*SMALL, "trainer.max_steps=2", "threads=2"], tmp_path, check=False)
    assert second.returncode == 2 and "is being run by" in second.stderr, second.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (job / ".hydra").iterdir()} == before
    assert not (job / "train.log").exists() or (job / "train.log").read_text() == ""


def test_a_run_dir_outside_the_log_dir_is_refused_before_anything_is_written(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    at_root = {p for p in ("/runs", "/sweeps") if os.path.exists(p)}

    def train(*args, multirun=False):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        flags = ["-m"] if multirun else []
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *SMALL, *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    empty = train("paths.log_dir=")
    assert empty.returncode == 2 and "paths.log_dir is empty" in empty.stderr, empty.stderr[-2000:]
    empty_sweep = train("paths.log_dir=", "seed=0,1", multirun=True)
    assert empty_sweep.returncode == 2 and "paths.log_dir is empty" in empty_sweep.stderr
    elsewhere = tmp_path / "elsewhere"
    outside = train(f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={elsewhere}")
    assert outside.returncode == 2 and "not inside the log directory" in outside.stderr
    assert "Traceback" not in empty.stderr + empty_sweep.stderr + outside.stderr
    assert list(cwd.iterdir()) == [] and not elsewhere.exists() and not (tmp_path / "logs").exists()
    assert {p for p in ("/runs", "/sweeps") if os.path.exists(p)} == at_root


def loss_steps(log_dir) -> dict[int, float]:
    (path,) = Path(log_dir).rglob("metrics.csv")
    with open(path) as f:
        return {
            int(r["step"]): float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")
        }


def test_every_logged_row_survives_a_sigkill_and_a_mid_epoch_resume(tmp_path):
    args = [
        *SMALL,
        "logger=csv",
        "trainer.max_epochs=1",
        "callbacks.checkpoint_interval.every_n_train_steps=3",
    ]
    run_train(args, tmp_path / "uninterrupted")
    killed = run_train([*args, "fault=SIGKILL@batch:20"], tmp_path / "resumed", check=False)
    assert killed.returncode == -9
    assert "resuming from" in run_train(args, tmp_path / "resumed").stdout
    reference, resumed = loss_steps(tmp_path / "uninterrupted"), loss_steps(tmp_path / "resumed")
    assert sorted(resumed) == sorted(reference) == [9, 19, 29]
    assert resumed == pytest.approx(reference, rel=1e-5)
