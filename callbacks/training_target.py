"""Stop training at a target train loss or accuracy, or when the loss diverges; record why.

Runs are compared at convergence, not after a fixed epoch count (a large batch takes few steps
per epoch). The target is checked on ``train_eval`` (the fixed, un-augmented training subset
measured in eval mode at every validation), so it is the same number on any device count.
The reason the run stopped is written into the run record: ``target_train_loss``,
``target_train_acc``, ``diverged`` (non-finite training loss), ``max_steps``, ``max_epochs``,
or ``interrupted``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from callbacks.run_record import annotate_run


class TrainingTarget(pl.Callback):
    def __init__(
        self,
        target_train_loss: float | None = None,
        target_train_acc: float | None = None,
        metric_prefix: str = "train_eval",
        check_finite: bool = True,
    ):
        if target_train_loss is not None and not target_train_loss > 0:
            raise ValueError(f"target_train_loss must be > 0 or null, got {target_train_loss!r}")
        if target_train_acc is not None and not 0 < target_train_acc <= 1:
            raise ValueError(f"target_train_acc must be in (0, 1] or null, got {target_train_acc!r}")
        self.target_loss, self.target_acc = target_train_loss, target_train_acc
        self.prefix, self.check_finite = metric_prefix, check_finite
        self.reason: str | None = None

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

    def on_train_end(self, trainer, pl_module) -> None:
        reason = self.reason
        if reason is None:
            if 0 < trainer.max_steps <= trainer.global_step:
                reason = "max_steps"
            elif trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
                reason = "max_epochs"
            else:
                reason = "interrupted"
        annotate_run(
            trainer,
            stop_reason=reason,
            stopped_at_step=trainer.global_step,
            stopped_at_epoch=trainer.current_epoch,
        )

    def state_dict(self) -> dict:
        return {"reason": self.reason}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reason = state_dict.get("reason")
