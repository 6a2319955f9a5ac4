"""A job stopped by its time limit is requeued and resumed: Hydra's submitit_local launcher.

``timeout_min=1`` (the launcher takes whole minutes): submitit sends its timeout signal (USR2)
30 s before the limit; its handler asks the launcher to checkpoint, which resubmits the same
job, and exits. The job's record says ``interrupted``; the requeued process finds the same run
directory, resumes from ``checkpoints/last.ckpt`` and finishes: one record, one history. This
is how requeue works on SLURM too (``hydra/launcher=slurm``, ``max_num_timeout``). About 1-2 min.
"""

from __future__ import annotations

import csv

import pytest

from tests.helpers import records, run_train

pytestmark = pytest.mark.slow

EPOCHS = 30  # 1.5 s of sleep each (plus the training): 45-90 s of work, 2-3 attempts of 30 s


def test_time_limited_job_is_requeued_resumed_and_finishes_once(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1", "logger=csv",
            "trainer.enable_progress_bar=false", "model=mlp", f"trainer.max_epochs={EPOCHS}", "threads=1",
            "~callbacks.hessian", "~callbacks.adversarial",
            "+callbacks.slow._target_=tests.integration.user_callback.SlowEpochs",
            "+callbacks.slow.seconds=1.5"]  # fmt: skip
    run_train(args, tmp_path, timeout=900)
    ((name, rec),) = records(tmp_path).items()
    assert rec["status"] == "completed", (rec.get("error"), rec.get("traceback"), rec.get("segments"))
    assert rec["stopped_at_epoch"] == EPOCHS
    ended = [s["ended"] for s in rec["segments"]]
    assert len(ended) >= 2 and ended[-1] == "completed" and set(ended[:-1]) == {"interrupted"}, ended
    assert all(s["from_step"] > 0 for s in rec["segments"][1:])  # each requeued process resumed
    epochs = [row["epoch"] for row in rec["history"] if "train/loss" in row]
    assert epochs == list(range(EPOCHS))  # one continuous history
    (metrics,) = tmp_path.rglob(f"{name}/csv/version_0/metrics.csv")
    with open(metrics) as f:
        assert sorted(float(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss")) == list(
            range(EPOCHS)
        )
    assert rec["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in rec["segments"]))
