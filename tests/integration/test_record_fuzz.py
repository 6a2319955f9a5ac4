"""A damaged record is read or refused with a message naming the field, never a traceback.

One real finished record (a short run made once for the module); then every top-level field in
turn is replaced by null, a list, a string, a number, or removed, and read as a re-run of
train.py reads it (:func:`lifecycle.job.read_previous`, then what the re-run does with a finished
record: compare its identity and print its summary) and as measure.py reads it
(:func:`lifecycle.saved_run.read_run`), in-process; train.py and measure.py run as subprocesses for a few
representative cases. Also: measure.py refuses before measuring when it could not save, or when the
job's lock is held, and two processes updating one record lose no update.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import measure
from lifecycle import saved_run
from lifecycle.guards import JobRefused, check_identity
from lifecycle.job import read_previous
from lifecycle.record import RECORD, read_record, update_record
from lifecycle.summary import summarize
from tests.helpers import FAST, ROOT, run_train

pytestmark = pytest.mark.slow

ARGS = [*FAST, "model=mlp", "threads=1", "trainer.max_epochs=1", "~callbacks.adversarial",
        "callbacks.hessian.subset_size=50", "callbacks.hessian.k=2"]  # fmt: skip
MISSING = object()
REPLACEMENTS = {"null": None, "list": [1, "a"], "string": "x", "number": 7, "missing": MISSING}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(log dir, run dir, record) of one finished run."""
    log = tmp_path_factory.mktemp("finished")
    run_train(ARGS, log)
    (path,) = log.rglob(RECORD)
    record = json.loads(path.read_text())
    assert record["status"] == "completed"
    return log, path.parent, record


def damaged(record: dict, field: str, replacement) -> dict:
    out = dict(record)
    if replacement is MISSING:
        del out[field]
    else:
        out[field] = replacement
    return out


def cases(record: dict):
    return [(f, n, r) for f in record for n, r in REPLACEMENTS.items()]


def test_every_damaged_field_is_read_or_refused_by_name_by_the_rerun_and_by_measure(finished, tmp_path):
    _, run_dir, record = finished
    job = tmp_path / "job"
    job.mkdir()
    cfg = OmegaConf.create(record["config"])
    outcomes = {"read": 0, "refused": 0}
    for field, name, replacement in cases(record):
        (job / RECORD).write_text(json.dumps(damaged(record, field, replacement)))
        where = f"{field} -> {name}"
        try:
            previous = read_previous(job / RECORD)
        except JobRefused as e:
            assert field in str(e), (where, str(e))
            outcomes["refused"] += 1
        else:
            check_identity(previous, record["identity"], cfg, job)  # what a re-run of it does
            assert "[train] status:" in summarize(previous, job), where
            outcomes["read"] += 1
        try:
            saved_run.read_run(job)
        except saved_run.Refused as e:
            assert field in str(e), (where, str(e))
    assert outcomes["read"] and outcomes["refused"], outcomes


def copy_run(run_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(run_dir, to / run_dir.relative_to(run_dir.parents[1])))


@pytest.mark.parametrize(
    "field,replacement,code,named",
    [("final", MISSING, 2, "final"), ("status", 7, 2, "status"), ("history", None, 0, "already finished")],
)
def test_train_on_a_damaged_record_reads_or_refuses_it_by_name(
    finished, tmp_path, field, replacement, code, named
):
    _, run_dir, record = finished
    job = copy_run(run_dir, tmp_path)
    (job / RECORD).write_text(json.dumps(damaged(record, field, replacement)))
    proc = run_train(ARGS, tmp_path, check=False)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert named in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_fresh_true_trains_over_a_damaged_record_as_its_refusal_message_says(finished, tmp_path):
    """The refusal says "run the job again with fresh=true": that must then work (one new record)."""
    _, run_dir, record = finished
    job = copy_run(run_dir, tmp_path)
    (job / RECORD).write_text(json.dumps(damaged(record, "status", 7)))
    refused = run_train(ARGS, tmp_path, check=False)
    assert refused.returncode == 2 and "fresh=true" in refused.stderr
    proc = run_train([*ARGS, "fresh=true"], tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deleting the unreadable" in proc.stdout
    again = read_record(job / RECORD)
    assert again["status"] == "completed" and len(again["segments"]) == 1


def test_measure_on_a_damaged_record_prints_the_field_and_exits_2(finished, tmp_path):
    _, run_dir, record = finished
    job = copy_run(run_dir, tmp_path)
    (job / RECORD).write_text(json.dumps(damaged(record, "identity", "x")))
    proc = subprocess.run([sys.executable, str(ROOT / "measure.py"), str(job)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "field 'identity'" in proc.stderr and "Traceback" not in proc.stderr


def test_measure_refuses_before_measuring_when_it_could_not_save(finished, tmp_path, capsys):
    _, run_dir, _ = finished
    job = copy_run(run_dir, tmp_path)
    (job / "measurements").write_text("")  # where results go cannot hold them (as a read-only directory)
    assert measure.main([str(job)]) == 2
    assert "cannot write into" in capsys.readouterr().err
    assert read_record(job / RECORD).get("checkpoint_measurements") is None


def test_measure_refuses_a_run_whose_job_lock_is_held(finished, tmp_path, capsys):
    _, run_dir, _ = finished
    job = copy_run(run_dir, tmp_path)
    with open(job / "job.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert measure.main([str(job), "--no-hessian"]) == 2
    err = capsys.readouterr().err
    assert "is being run by" in err and "not measured at the same time" in err
    assert read_record(job / RECORD).get("checkpoint_measurements") is None


def _updates(path: str, key: str, n: int) -> None:
    for i in range(n):
        update_record(path, **{key: i})


def test_two_processes_updating_one_record_lose_no_update_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / RECORD
    update_record(path, status="running")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_updates, args=(str(path), f"p{i}", 1000)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    record = json.loads(path.read_text())
    assert (record["p0"], record["p1"], record["status"]) == (999, 999, "running")
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD, RECORD + ".lock"]
