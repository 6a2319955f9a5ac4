"""Runs a researcher can trust: identity, every ending recorded, interruptions that leave one run.

Faults are delivered at a named phase by the config key ``fault=ACTION@POINT`` (the
``FaultInjection`` callback the lifecycle adds; not part of the job's identity or directory), never by timed sleeps, so each test hits the phase it names. The
resumed runs are compared with an uninterrupted run of the same BN-free model and seeds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import FAST, NO_MEASURE, ROOT, records, run_train, wall_clock

pytestmark = pytest.mark.slow

# 3 epochs of 32 steps, both measurement callbacks on, small; the CSV log is checked too
BASE = ["logger=csv", "trainer.enable_progress_bar=false", "model=mlp", "trainer.max_epochs=3", "threads=1",
        "callbacks.hessian.subset_size=200", "callbacks.hessian.k=2",
        "callbacks.adversarial.subset_size=100", "callbacks.adversarial.eps=[0,0.1]",
        "callbacks.adversarial.pgd_steps=3"]  # fmt: skip


def comparable(final: dict) -> dict:
    return {k: v for k, v in final.items() if not wall_clock(k)}


def only_record(log_dir: Path) -> tuple[Path, dict]:
    ((name, rec),) = records(log_dir).items()
    return next(Path(log_dir).rglob(f"{name}/results.json")).parent, rec


def assert_one_run(rec: dict, job: Path, epochs: int = 3) -> None:
    """Each epoch once in the history and in the CSV log; the wall time is the sum of the segments."""
    rows = Counter(
        (row["step"], key) for row in rec["history"] for key in row if key not in ("step", "epoch")
    )
    assert max(rows.values()) == 1, [k for k, n in rows.items() if n > 1][:5]
    assert sorted(row["epoch"] for row in rec["history"] if "train/loss" in row) == list(range(epochs))
    with open(job / "csv" / "version_0" / "metrics.csv") as f:
        csv_epochs = sorted(float(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss"))
    assert csv_epochs == list(range(epochs))
    assert rec["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in rec["segments"]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    log = tmp_path_factory.mktemp("reference")
    run_train(BASE, log)
    return only_record(log)[1]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_epoch_is_recorded_and_the_same_command_resumes_to_the_uninterrupted_result(
    tmp_path, reference, sig, code
):
    proc = run_train([*BASE, f"fault={sig}@batch:40"], tmp_path, check=False)
    assert proc.returncode == code, proc.stderr[-2000:]
    job, rec = only_record(tmp_path)
    assert rec["status"] == "interrupted" and sig in rec["error"]
    assert "Run the same command to resume" in proc.stderr
    again = run_train(BASE, tmp_path)
    assert "resuming from" in again.stdout
    job, rec = only_record(tmp_path)
    assert rec["status"] == "completed" and len(rec["segments"]) == 2
    # SIGTERM (preemption) writes a checkpoint at the step it arrived; Ctrl-C resumes from the epoch end
    assert rec["segments"][1]["from_step"] == {"SIGTERM": 40, "SIGINT": 32}[sig]
    assert comparable(rec["final"]) == comparable(reference["final"])
    assert_one_run(rec, job)


@pytest.mark.parametrize("point", ["final_measurement", "train_end"])
def test_sigkill_late_in_training_the_rerun_measures_again_and_equals_the_uninterrupted_run(
    tmp_path, reference, point
):
    proc = run_train([*BASE, f"fault=SIGKILL@{point}"], tmp_path, check=False)
    assert proc.returncode == -9
    assert only_record(tmp_path)[1]["status"] == "running"  # SIGKILL leaves no word: the next run resumes
    run_train(BASE, tmp_path)
    job, rec = only_record(tmp_path)
    assert rec["status"] == "completed" and rec["stop_reason"] == "max_epochs"
    assert rec["stopped_at_epoch"] == 3
    assert [s["ended"] for s in rec["segments"]] == ["killed", "completed"]
    assert comparable(rec["final"]) == comparable(reference["final"])
    assert (
        rec["stopped_at_step"] == 96 and rec["final_step"]["hessian/lambda_1"] == 95
    )  # last row, step 96 - 1
    assert_one_run(rec, job)


def test_sweep_interrupted_by_sigterm_says_what_it_did_not_run_then_resumes(tmp_path):
    grid = ["-m", *NO_MEASURE, "model=mlp", "trainer.max_steps=6", "threads=1", "optimizer.lr=0.01,0.02"]
    proc = run_train([*grid, "fault=SIGTERM@batch:3"], tmp_path, check=False)
    assert proc.returncode == 143
    assert "1 job(s) of this sweep did not run" in proc.stderr and "optimizer.lr=0.02" in proc.stderr
    assert [r["status"] for r in records(tmp_path).values()] == ["interrupted"]
    run_train(grid, tmp_path)
    assert sorted(r["status"] for r in records(tmp_path).values()) == ["completed", "completed"]


def test_an_exception_fails_the_job_with_its_message_and_the_sweep_goes_on(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb")
    )
    (project / "callbacks" / "boom.py").write_text(
        "import pytorch_lightning as pl\n\n\n"
        "class Boom(pl.Callback):\n"
        '    """Raises at epoch 1 when lr > 0.015 (a user\'s buggy callback)."""\n\n'
        "    def on_train_epoch_end(self, trainer, pl_module):\n"
        "        if pl_module.sgd.lr > 0.015 and trainer.current_epoch == 1:\n"
        '            raise RuntimeError("boom at epoch 1")\n'
    )
    (project / "conf" / "callbacks" / "boom.yaml").write_text("boom:\n  _target_: callbacks.boom.Boom\n")
    env = {**os.environ, "SGD_LOG_DIR": str(tmp_path / "logs"), "WANDB_MODE": "disabled"}
    args = ["-m", *NO_MEASURE, "callbacks=[default,boom]",
            "model=mlp", "trainer.max_epochs=3", "threads=1", "optimizer.lr=0.02,0.01"]  # fmt: skip
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    status = {r["config"]["optimizer"]["lr"]: r for r in records(tmp_path / "logs").values()}
    assert set(status) == {0.01, 0.02}, (status, proc.stderr[-3000:])
    assert status[0.01]["status"] == "completed"
    failed = status[0.02]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom at epoch 1"
    assert "boom.py" in failed["traceback"] and "1 job(s) failed" in proc.stderr


def test_changed_yaml_refuses_naming_the_key_a_logger_change_does_not_and_a_code_change_asks(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb")
    )
    env = {**os.environ, "SGD_LOG_DIR": str(tmp_path / "logs"), "WANDB_MODE": "disabled"}
    args = [*FAST, "model=mlp", "trainer.max_steps=2", "threads=1", "callbacks.hessian.subset_size=50",
            "~callbacks.adversarial"]  # fmt: skip

    def train(*extra):
        return subprocess.run([sys.executable, "train.py", *args, *extra], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    assert train().returncode == 0
    job, before = only_record(tmp_path / "logs")
    sgd = project / "conf" / "optimizer" / "sgd.yaml"
    original = sgd.read_text()
    sgd.write_text(original.replace("lr: 0.01", "lr: 0.02"))
    refused = train()
    assert refused.returncode == 2 and "optimizer.lr: 0.01 -> 0.02" in refused.stderr
    assert "fresh=true" in refused.stderr and "Traceback" not in refused.stderr
    sgd.write_text(original)

    hessian = project / "conf" / "callbacks" / "hessian.yaml"
    hessian.write_text(hessian.read_text().replace("k: 3 ", "k: 2 "))
    measured = train()
    assert measured.returncode == 2 and "callbacks.hessian.k: 3 -> 2" in measured.stderr
    assert "python measure.py" in measured.stderr
    hessian.write_text(hessian.read_text().replace("k: 2 ", "k: 3 "))

    assert "already finished" in train("logger=csv").stdout  # a logger change never blocks

    models = project / "lightning_modules" / "models.py"
    models.write_text(models.read_text() + "\n# a change\n")
    code = train()
    assert code.returncode == 2 and "accept_code_change=true" in code.stderr
    accepted = train("accept_code_change=true")
    assert accepted.returncode == 0 and "already finished" in accepted.stdout
    _, after = only_record(tmp_path / "logs")
    assert len(after["accepted_code_changes"]) == 1 and after["final"] == before["final"]


def test_two_launches_of_one_job_one_refuses(tmp_path):
    args = [*NO_MEASURE, "model=mlp", "trainer.max_epochs=500", "threads=1"]  # long: stopped below
    env = {**os.environ, "SGD_LOG_DIR": str(tmp_path), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(
            p.read_text().startswith("pid") for p in tmp_path.rglob("job.lock")
        ):
            time.sleep(0.05)
        second = run_train(args, tmp_path, check=False)
        assert first.poll() is None  # the first still runs
        assert second.returncode == 2 and f"is being run by pid {first.pid}" in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=300)
    assert first.returncode == 143
    job, rec = only_record(tmp_path)
    assert rec["status"] == "interrupted" and len(rec["segments"]) == 1  # the refused launch wrote nothing


def test_unreadable_record_or_checkpoint_is_named_with_the_way_out(tmp_path):
    args = [*NO_MEASURE, "model=mlp", "trainer.max_epochs=1", "threads=1"]
    run_train(args, tmp_path)
    job, _ = only_record(tmp_path)
    record = job / "results.json"
    text = record.read_text()
    record.write_text(text[: len(text) // 2])
    broken = run_train(args, tmp_path, check=False)
    assert broken.returncode == 2 and str(record) in broken.stderr and "Traceback" not in broken.stderr
    assert record.read_text() == text[: len(text) // 2]  # never a silent restart over the record
    record.write_text(text.replace('"status": "completed"', '"status": "running"'))
    ckpt = job / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    broken = run_train(args, tmp_path, check=False)
    assert broken.returncode == 2 and str(ckpt) in broken.stderr and "fresh=true" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_diverged_record_is_strict_json(tmp_path):
    run_train([*NO_MEASURE, "optimizer.lr=1e6", "trainer.max_epochs=2", "model=mlp"], tmp_path)
    job, rec = only_record(tmp_path)

    def refuse(name):
        raise AssertionError(f"bare {name} in results.json")

    strict = json.loads((job / "results.json").read_text(), parse_constant=refuse)
    assert strict["status"] == "diverged" and strict["stopped_at_epoch"] == 0
    assert "nan" in {strict["final"].get("train/loss"), strict["last"].get("train/loss")}
    assert "after 0 epochs" in run_train([*NO_MEASURE, "optimizer.lr=1e6", "trainer.max_epochs=2", "model=mlp"],
                                         tmp_path).stdout  # fmt: skip
