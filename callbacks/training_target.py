"""``TrainingTarget``: stop at a target train loss or accuracy, or on divergence; record why."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from callbacks.epoch_measurement import stopping_after_this_epoch
from lightning_modules.config import check


def annotate_run(trainer: pl.Trainer, **fields) -> None:
    """Hand run-level facts (e.g. the stop reason) to every logger that takes them.

    A logger takes them by having an ``annotate(**fields)`` method (the run record does); other
    loggers are left alone. Loggers log on rank 0 only.
    """
    for logger in trainer.loggers:
        annotate = getattr(logger, "annotate", None)
        if callable(annotate):
            annotate(**fields)


class TrainingTarget(pl.Callback):
    """Stop at a target train loss or accuracy, or when the loss diverges; record why.

    Runs are compared at convergence, not after a fixed epoch count (a large batch takes few
    steps per epoch). The target is checked on ``{metric_prefix}/loss`` and ``/acc`` (by default
    ``train_eval``: the fixed, un-augmented training subset measured in eval mode at every
    validation), so it is the same number on any device count. At the end of the last epoch,
    before its checkpoint is written, the reason (``target_train_loss``, ``target_train_acc``,
    ``diverged`` (non-finite training loss, checked every step when ``check_finite``),
    ``max_steps`` or ``max_epochs``), the step and the number of full epochs done are handed to the
    loggers that take them (:func:`annotate_run`); they are also checkpointed, so a run resumed
    after its training ended hands them over again.

    Args:
        target_train_loss: stop once the train loss is at most this (null: no target).
        target_train_acc: stop once the train accuracy is at least this, in (0, 1].
        metric_prefix: whose loss/accuracy is checked.
        check_finite: stop when the training loss is not finite.
    """

    def __init__(
        self,
        target_train_loss: float | None = None,
        target_train_acc: float | None = None,
        metric_prefix: str = "train_eval",
        check_finite: bool = True,
    ):
        check(
            target_train_loss is None or target_train_loss > 0,
            "target_train_loss",
            target_train_loss,
            "must be > 0 or null",
        )
        check(
            target_train_acc is None or 0 < target_train_acc <= 1,
            "target_train_acc",
            target_train_acc,
            "must be in (0, 1] or null",
        )
        self.target_loss, self.target_acc = target_train_loss, target_train_acc
        self.prefix, self.check_finite = metric_prefix, check_finite
        self.reason: str | None = None
        self.stopped: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.check_finite:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.reason = "diverged"
            trainer.should_stop = True
            rank_zero_info(
                f"[TrainingTarget] training loss is not finite at step {trainer.global_step}: stopping."
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.reason == "diverged":
            return
        m = trainer.callback_metrics
        loss, acc = m.get(f"{self.prefix}/loss"), m.get(f"{self.prefix}/acc")
        reason = None
        if self.target_loss is not None and loss is not None and float(loss) <= self.target_loss:
            reason = "target_train_loss"
        elif self.target_acc is not None and acc is not None and float(acc) >= self.target_acc:
            reason = "target_train_acc"
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            self.reason = reason
            trainer.should_stop = True
            rank_zero_info(f"[TrainingTarget] {reason} reached at epoch {trainer.current_epoch}: stopping.")

    def _stop(self, trainer) -> dict:
        reason = self.reason
        if reason is None:
            reason = "max_steps" if 0 < trainer.max_steps <= trainer.global_step else "max_epochs"
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        whole_epoch = batches >= trainer.num_training_batches
        return {
            "stop_reason": reason,
            "stopped_at_step": trainer.global_step,
            "stopped_at_epoch": trainer.current_epoch + int(whole_epoch),
        }

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if stopping_after_this_epoch(trainer):
            self.stopped = self._stop(trainer)
            annotate_run(trainer, **self.stopped)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.stopped:  # restored from a checkpoint written after training ended
            annotate_run(trainer, **self.stopped)

    def state_dict(self) -> dict:
        return {"reason": self.reason, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reason = state_dict.get("reason")
        self.stopped = state_dict.get("stopped")
