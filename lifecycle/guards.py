"""What guards a job before and while it runs: one process per job (the lock), signals turned into
a recorded interruption, and the identity check that keeps a result with the config and code that
produced it. :mod:`lifecycle.job` uses them around each job; ``measure.py`` takes the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from lifecycle.identity import changes
from lifecycle.record import FINISHED

LOCK = "job.lock"
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class JobRefused(Exception):
    """The job cannot start: a bad value, a changed identity, a lock held, an unreadable file."""


class Interrupted(Exception):
    """SIGINT or SIGTERM ended the job; ``signal_name`` says which."""

    def __init__(self, signal_name: str):
        super().__init__(f"{signal_name} received")
        self.signal_name = signal_name


@contextlib.contextmanager
def job_lock(out_dir: Path, why: str | None = None):
    """Hold ``out_dir/job.lock`` for the job (``flock``: released by the kernel if the process dies).

    Held by ``train.py`` while a job runs and by ``measure.py`` while it measures the job's
    checkpoint; ``why`` says why the second of them is refused."""
    path = out_dir / LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise JobRefused(
                f"{out_dir} is being run by {holder}: "
                + (
                    why
                    or "two launches of one job at the same time would write into one directory. Wait for "
                    "it to end, or stop it; a job whose process died (even by SIGKILL) holds no lock and "
                    "is resumed by the next run of the same command."
                )
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def signals_recorded(received: dict):
    """Note SIGTERM/SIGINT in ``received``; outside Lightning turn them into :class:`Interrupted`.

    Inside ``fit``/``validate`` Lightning handles both (it stops after the current batch; its
    SIGTERM handler calls this one too, which then only takes note), so ``received["in_trainer"]``
    is set around those calls.
    """

    def handler(signum, frame):
        name = signal.Signals(signum).name
        received.setdefault("signal", name)
        if not received.get("in_trainer"):
            raise Interrupted(name)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # what Lightning expects from Ctrl-C

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at; an unreadable file is refused with a way out."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as e:
        raise JobRefused(
            f"{path} cannot be read ({type(e).__name__}: {e}). It is the point this job resumes from; "
            "fresh=true trains the job again from the start (its record is replaced)."
        ) from None


def check_identity(previous: dict, now: dict, cfg: DictConfig, out_dir: Path) -> dict | None:
    """Refuse a re-run whose result would not belong to the recorded one; returns an accepted code change."""
    before = previous.get("identity")
    if not before:
        return None
    finished = previous.get("status") in FINISHED
    trained = changes(before.get("training", {}), now["training"])
    if trained:
        raise JobRefused(
            f"{out_dir} holds a {'finished' if finished else 'started'} run of a different training config:\n    "
            + "\n    ".join(trained)
            + "\nfresh=true trains this job again in place (the old result is deleted); to keep both, give the "
            "new one its own directory with an extra override, e.g. +variant=new."
        )
    measured = changes(before.get("measurement", {}), now["measurement"])
    if measured:
        hint = (
            f"re-measure its checkpoint instead of retraining: python measure.py {out_dir} (see --help)"
            if finished
            else "resume it with the settings it started with, or fresh=true to start over with the new ones"
        )
        raise JobRefused(
            f"{out_dir} holds a run measured with other settings:\n    "
            + "\n    ".join(measured)
            + f"\n{hint}."
        )
    if before.get("code") != now["code"]:
        if not cfg.get("accept_code_change"):
            raise JobRefused(
                f"{out_dir} holds a run made by other code (code hash {before.get('code')}, now {now['code']}: "
                "measures/, lightning_modules/, callbacks/, lifecycle/ or train.py changed). Its result may not "
                "be what this code computes. fresh=true trains it again; accept_code_change=true "
                + ("reports it as it is" if finished else "resumes it with this code")
                + " and records that you accepted the change."
            )
        return {"from": before.get("code"), "to": now["code"], "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return None
