"""train.py killed inside an epoch and rerun: it resumes at the exact batch and ends on the same weights.

Run A trains two epochs uninterrupted on one device. Run B is the same run with a mid-epoch
checkpoint every 5 optimizer steps, on one device or on two (DDP, other micro-batches): it is
killed (SIGKILL, its whole process group) once ``last.ckpt`` holds a step inside the second
epoch, then rerun with the same command, which resumes from that checkpoint. In float64 on one
thread, with gradient accumulation, momentum and a cosine schedule, B's final weights and
per-epoch records must be A's (1 and 2 devices differ by ~1e-17 here: the same global batches).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import NO_MEASURE, ROOT, records, run_train

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 32  # 4,000 digits / 128
ARGS = [
    *NO_MEASURE,
    "model=mlp",
    "threads=1",
    "trainer.precision=64-true",
    "trainer.max_epochs=2",
    "optimizer.schedule=cosine",
]
ONE_DEVICE = ["max_micro_batch=64"]  # 2 micro-batches per step
TWO_DEVICES = ["trainer=ddp_spawn", "trainer.devices=2", "max_micro_batch=32"]  # 2 per step per device
EVERY = ["callbacks.checkpoint_interval.every_n_train_steps=5"]


def checkpoint_step(ckpt) -> int | None:
    try:
        return torch.load(ckpt, weights_only=False)["global_step"]
    except Exception:  # not there yet, or being written
        return None


def kill_inside_second_epoch(args: list[str], log_dir) -> int | None:
    """Start ``train.py ARGS``, SIGKILL it once last.ckpt holds a step inside epoch 1; that step, or
    None if the kill came too late."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**os.environ, "SGD_LOG_DIR": str(log_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the DDP workers it spawns die with it
    )
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            cks = list(log_dir.rglob("checkpoints/last.ckpt"))
            step = checkpoint_step(cks[0]) if cks else None
            if step is not None and STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH - 5:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (ckpt,) = log_dir.rglob("checkpoints/last.ckpt")
    step = checkpoint_step(ckpt)
    return step if step % STEPS_PER_EPOCH else None  # killed after the epoch end: try again


def per_epoch(rec: dict, key: str) -> list[float]:
    return [row[key] for row in rec["history"] if key in row]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    log_a = tmp_path_factory.mktemp("a")
    run_train([*ARGS, *ONE_DEVICE], log_a)
    (rec_a,) = records(log_a).values()
    return rec_a, torch.load(next(log_a.rglob("last.ckpt")), weights_only=False)


@pytest.mark.parametrize("devices", [ONE_DEVICE, TWO_DEVICES], ids=["one_device", "two_devices"])
def test_killed_mid_epoch_then_rerun_ends_on_the_uninterrupted_weights(tmp_path, uninterrupted, devices):
    rec_a, final_a = uninterrupted
    args = [*ARGS, *devices, *EVERY]
    for attempt in range(3):  # the kill races the training: a late one is tried again in a new directory
        log_b = tmp_path / f"b{attempt}"
        killed_at = kill_inside_second_epoch(args, log_b)
        if killed_at is not None:
            break
    assert killed_at is not None, "never killed inside the second epoch"
    (rec,) = records(log_b).values()
    assert rec["status"] == "running" and STEPS_PER_EPOCH < killed_at < 2 * STEPS_PER_EPOCH

    out = run_train(args, log_b)  # the same command: resumes from last.ckpt
    assert "resuming from" in out.stdout
    (rec_b,) = records(log_b).values()
    assert rec_b["status"] == "completed" and rec_b["resumed_from"].endswith("last.ckpt")
    final_b = torch.load(next(log_b.rglob("last.ckpt")), weights_only=False)
    assert final_a["global_step"] == final_b["global_step"] == 2 * STEPS_PER_EPOCH

    state_a, state_b = final_a["state_dict"], final_b["state_dict"]
    assert state_a.keys() == state_b.keys() and state_a["net.body.1.weight"].dtype == torch.float64
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], rtol=0, atol=1e-12), k
    moms_a = [s["momentum_buffer"] for s in final_a["optimizer_states"][0]["state"].values()]
    moms_b = [s["momentum_buffer"] for s in final_b["optimizer_states"][0]["state"].values()]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(moms_a, moms_b, strict=True))
    # the interrupted epoch's train loss/accuracy cover the whole epoch, as in run A
    assert len(per_epoch(rec_b, "train/loss")) == 2  # one row per epoch, none twice
    for key in ("train/loss", "train/acc", "val/acc"):
        assert per_epoch(rec_b, key) == pytest.approx(per_epoch(rec_a, key), rel=0, abs=1e-12), key
