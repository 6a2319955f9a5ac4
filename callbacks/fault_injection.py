"""``FaultInjection``: deliver a signal, or raise, at a chosen point of training (a test tool)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl

from callbacks.epoch_measurement import stopping_after_this_epoch
from lightning_modules.config import check

POINTS = ("batch", "final_measurement", "train_end")
ACTIONS = ("SIGINT", "SIGTERM", "SIGKILL", "raise")


class FaultInjection(pl.Callback):
    """Interrupt the run in a chosen phase, as a scheduler, a user or a bug would.

    A test tool, not a training setting. The job lifecycle adds it (first in the callback list)
    when the config key ``fault`` is ``ACTION@POINT`` (``python train.py fault=SIGTERM@batch:5``,
    ``fault=SIGKILL@final_measurement``, ``fault=raise@batch:40``), so that a test or the
    fault-injection benchmark hits the phase it names instead of sleeping and hoping. ``fault``
    is neither part of the run's identity (:data:`lifecycle.identity.NOT_TRAINING`) nor of its
    directory name (``conf/hydra/default.yaml``), so re-running the plain command resumes the
    faulted run.

    Args:
        action: ``SIGINT``, ``SIGTERM`` or ``SIGKILL`` (sent to this process) or ``raise``
            (a ``RuntimeError`` from the callback, as a buggy user callback would).
        point: ``batch:K`` (after optimizer step K), ``final_measurement`` (at the start of the
            last epoch-end measurement, before any measurement callback runs), ``train_end``
            (in ``on_train_end``, after the last checkpoint).
    """

    def __init__(self, action: str, point: str):
        check(action in ACTIONS, "action", action, f"allowed: {', '.join(ACTIONS)}")
        kind, _, arg = point.partition(":")
        check(kind in POINTS, "point", point, "allowed: batch:K, final_measurement, train_end")
        check(kind != "batch" or arg.isdigit(), "point", point, "batch:K needs an integer step K")
        self.action, self.kind, self.step = action, kind, int(arg) if arg else None

    @classmethod
    def parse(cls, value: str) -> FaultInjection:
        """``ACTION@POINT`` (the config key ``fault``) as a callback."""
        action, _, point = value.partition("@")
        return cls(action, point)

    def _fire(self) -> None:
        if self.action == "raise":
            raise RuntimeError(f"FaultInjection: an error raised at {self.kind}")
        os.kill(os.getpid(), getattr(signal, self.action))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.kind == "batch" and trainer.global_step == self.step and trainer.is_global_zero:
            self._fire()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.kind == "final_measurement" and stopping_after_this_epoch(trainer) and trainer.is_global_zero:
            self._fire()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.kind == "train_end" and trainer.is_global_zero:
            self._fire()
