"""``MidEpochCheckpoint``: the resume point inside long epochs, every N optimizer steps or T minutes."""

from __future__ import annotations

from datetime import timedelta

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.config import check


class MidEpochCheckpoint(ModelCheckpoint):
    """Write ``last.ckpt`` inside epochs: every ``every_n_train_steps`` optimizer steps or every
    ``every_n_minutes`` of training; off when both are null (the default).

    It writes only right after an optimizer step (with gradient accumulation, never between the
    micro-batches of one step, whose summed gradient a checkpoint does not hold) and never at an
    epoch's last batch (Lightning would resume from it past that epoch's validation and
    epoch-end measurements; the epoch-end checkpoint comes right after them). A time-based save
    that falls elsewhere waits for the next step that qualifies. On SIGTERM (a scheduler's
    preemption) it writes one at once if the signal arrived on such a step boundary in a
    one-process run, so the interrupted epoch's progress is kept (on several processes the ranks
    have not yet agreed to stop there; the last regular checkpoint is the resume point). The
    training loader
    (:class:`lightning_modules.data.ResumableLoader`) is in the checkpoint too, so a run resumed
    from it trains on exactly the batches an uninterrupted run would have.

    Args:
        dirpath, filename: where; the epoch-end ``checkpoint_last`` writes the same file, so a rerun
            resumes from whichever came last.
        every_n_train_steps: write every this many optimizer steps (null: not by steps).
        every_n_minutes: write once this many minutes of training have passed since the last write
            (null: not by time); rank 0's clock decides for every rank.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
    ):
        check(
            every_n_train_steps is None
            or (isinstance(every_n_train_steps, int) and every_n_train_steps >= 1),
            "every_n_train_steps",
            every_n_train_steps,
            "must be an integer >= 1, or null",
        )
        check(
            every_n_minutes is None or (isinstance(every_n_minutes, int | float) and every_n_minutes > 0),
            "every_n_minutes",
            every_n_minutes,
            "must be a number > 0, or null",
        )
        check(
            every_n_train_steps is None or every_n_minutes is None,
            "every_n_minutes",
            every_n_minutes,
            f"give every_n_train_steps ({every_n_train_steps}) or every_n_minutes, not both",
        )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
            every_n_train_steps=every_n_train_steps or 0,
            train_time_interval=None if every_n_minutes is None else timedelta(minutes=every_n_minutes),
            every_n_epochs=0,  # epoch ends are checkpoint_last's
        )
        self._step_at_batch_start = 0

    @property
    def state_key(self) -> str:
        # one key whatever the interval, so a run resumed with another interval keeps its state
        return self._generate_state_key(filename=self.filename)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if stepped and not last_of_epoch:
            if trainer.received_sigterm and trainer.world_size == 1:
                trainer.save_checkpoint(f"{self.dirpath}/{self.filename}{self.FILE_EXTENSION}")
                return
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
