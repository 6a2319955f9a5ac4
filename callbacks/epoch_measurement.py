"""What the measurement callbacks share: when they measure, and what they restore and record.

A subclass implements ``_measure_module(trainer, pl_module) -> metrics``. This base calls it
every ``every_n_epochs`` epochs at the end of the training epoch (after validation; the values
are the same on every rank, so they are logged without a sync), and once more when training
ends if the last measurement is older than the last step (written through the loggers, since
Lightning forbids ``self.log`` there). A diverged model (non-finite weights, identical on every
rank) is not measured. The step of the last measurement is checkpointed, so a resumed run does
not measure the same weights twice.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from callbacks.common import fixed_subset_indices, load_items, shard_for_rank
from callbacks.run_record import log_after_training


def load_rank_subset(dataset, size: int | None, seed: int, rank: int, world: int):
    """(x, y, idx) of this rank's block of the fixed subset: the same samples every epoch and run."""
    mine = shard_for_rank(fixed_subset_indices(len(dataset), size, seed), rank, world)
    return (*load_items(dataset, mine), mine)


class EpochEndMeasurement(pl.Callback):
    def __init__(self, every_n_epochs: int, at_end: bool, name: str):
        if not (isinstance(every_n_epochs, int) and every_n_epochs >= 1):
            raise ValueError(f"{name}.every_n_epochs={every_n_epochs!r}: must be an integer >= 1")
        self.every_n_epochs, self.at_end = every_n_epochs, at_end
        self._last_step: int | None = None

    def _measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> dict[str, float]:
        raise NotImplementedError

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> dict[str, float]:
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            return {}  # a diverged run: nothing to measure (the same on every rank)
        self._last_step = trainer.global_step
        return self._measure_module(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and (
            metrics := self._run(trainer, pl_module)
        ):
            pl_module.log_dict(metrics, sync_dist=False)  # the same on every rank

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.at_end
            and self._last_step != trainer.global_step
            and (metrics := self._run(trainer, pl_module))
        ):
            log_after_training(trainer, metrics)

    def state_dict(self) -> dict:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_step = state_dict.get("last_step")
