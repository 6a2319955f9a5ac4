"""``EpochEndMeasurement``: the base to subclass for a measurement taken at epoch ends.

See docs/extending.md, "Adding a callback", for a worked example.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_modules.config import ConfigError, check
from lightning_modules.module import log_rank_identical


def stopping_after_this_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch that is ending is the last one: the epoch cap, the step budget, or a stop
    decision (a target reached, divergence) already taken."""
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    out_of_steps = 0 < trainer.max_steps <= trainer.global_step
    return bool(trainer.should_stop or last_epoch or out_of_steps)


def log_after_training(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log metrics where Lightning forbids ``self.log`` (``on_train_end``): straight to the loggers
    (rank 0), and into ``trainer.callback_metrics`` so the caller of ``fit`` sees them."""
    values = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        # the epoch that just ended (Lightning has already advanced its counter), as self.log would add
        row = {**values, "epoch": float(max(trainer.current_epoch - 1, 0))}
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
            logger.save()
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})


class EpochEndMeasurement(pl.Callback):
    """Base of the measurement callbacks: when they measure, and what they guard and checkpoint.

    A subclass implements ``measure_module(trainer, pl_module) -> {name: value}`` (names under
    ``f"{self.prefix}/"``). This base calls it at the end of every ``every_n_epochs``-th training
    epoch (after validation), or with ``every_n_steps`` at the first epoch end after each multiple
    of that many optimizer steps, and, with ``at_end``, at the end of the last epoch whatever its
    number (:func:`stopping_after_this_epoch`), and logs the values without a sync, so they must be
    the same on every rank. The last epoch's measurement is taken before that epoch's checkpoint
    is written (Lightning runs checkpoint callbacks last), so a run interrupted during it resumes
    from the previous checkpoint and measures again: a final value is never older than the final
    weights. A diverged model (non-finite weights, the same on every rank) is not measured.

    Args:
        every_n_epochs: measure at the end of every n-th epoch.
        every_n_steps: instead, measure at the first epoch end at or after every n-th optimizer
            step (exactly one of the two is set): runs with different batch sizes are then
            measured at comparable points of training, and a large-batch run, whose epochs are
            a few steps each, is not measured at every one of its many epochs.
        at_end: measure the final weights too.
        prefix: the metric namespace (``hessian``, ``adv``); two instances of one callback need
            different prefixes. It is also the checkpoint key (:attr:`state_key`), which holds
            the step of the last measurement, so a resumed run does not measure the same weights
            twice.

    What it needs of the datamodule: ``trainer.datamodule.measurement_dataset(split)``, an
    un-augmented ``"train"``/``"test"`` dataset of ``(image, label)`` items (see
    :meth:`measurement_dataset`; with ``data.on_device`` its tensors are already on the training
    device, so a subset taken of it at ``setup`` is there once, not copied at each measurement), and, for the attack callback, ``trainer.datamodule.info``
    (a :class:`lightning_modules.data.DatasetInfo`); :class:`lightning_modules.data.ImageDataModule`
    has both.
    """

    def __init__(
        self, every_n_epochs: int | None, at_end: bool, prefix: str, every_n_steps: int | None = None
    ):
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            check(
                value is None or (isinstance(value, int) and value >= 1),
                name,
                value,
                "must be an integer >= 1 (or null)",
            )
        check(
            (every_n_epochs is None) != (every_n_steps is None),
            "every_n_steps",
            every_n_steps,
            f"set exactly one of every_n_epochs (now {every_n_epochs}) and every_n_steps "
            "(set the other to null)",
        )
        check(
            isinstance(prefix, str) and prefix != "" and "/" not in prefix,
            "prefix",
            prefix,
            "a name without '/'",
        )
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.at_end, self.prefix = at_end, prefix
        self._last_step: int | None = None

    @property
    def schedule(self) -> str:
        """When it measures, in words (for the callbacks' descriptions)."""
        if self.every_n_steps is not None:
            return f"at the first epoch end after every {self.every_n_steps} steps"
        return f"every {self.every_n_epochs} epoch(s)"

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether the epoch that is ending is one to measure at (``at_end`` aside)."""
        if self.every_n_steps is not None:  # a multiple of n steps passed since the last measurement
            return trainer.global_step // self.every_n_steps > (self._last_step or 0) // self.every_n_steps
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def measurement_dataset(self, trainer: pl.Trainer, split: str):
        """The datamodule's un-augmented ``split`` ("train" or "test"), with a clear error if it has none."""
        get = getattr(trainer.datamodule, "measurement_dataset", None)
        if get is None:
            raise ConfigError(
                "data",
                type(trainer.datamodule).__name__,
                f"{type(self).__name__} needs a datamodule with measurement_dataset(split) "
                "(e.g. lightning_modules.data.ImageDataModule)",
            )
        return get(split)

    @staticmethod
    def split_size(datamodule, split: str) -> int | None:
        """The number of samples in the datamodule's ``split`` ("train", "test"), known without
        loading the data, or None when the datamodule cannot tell (``split_size(split)``)."""
        get = getattr(datamodule, "split_size", None)
        return None if get is None else get(split)

    @staticmethod
    def check_subset_size(subset_size) -> None:
        """Refuse a fixed subset size that is not a positive integer (null: the whole split)."""
        check(
            subset_size is None or (isinstance(subset_size, int) and subset_size >= 1),
            "subset_size",
            subset_size,
            "must be a positive integer or null (all)",
        )

    def check_subset(self, datamodule, split: str, subset_size: int | None) -> None:
        """Refuse a fixed subset of ``subset_size`` samples larger than the datamodule's ``split``."""
        size = self.split_size(datamodule, split)
        check(
            subset_size is None or size is None or subset_size <= size,
            "subset_size",
            subset_size,
            f"larger than the {size} {'training' if split == 'train' else split} images (null: all of them)",
        )

    def check_against(self, model: torch.nn.Module, datamodule) -> None:
        """Refuse, before training, settings this model and data cannot serve (a subset larger
        than the data, more eigenvalues than parameters): raise :class:`ConfigError` naming the
        setting. The job lifecycle calls it after building the model and the datamodule, and
        reports the key as ``callbacks.<name>.<key>``. The default checks nothing."""

    def measure_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> dict[str, float]:
        raise NotImplementedError

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> dict[str, float]:
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            return {}  # a diverged run: nothing to measure (the same on every rank)
        self._last_step = trainer.global_step
        return self.measure_module(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.due(trainer) or (self.at_end and stopping_after_this_epoch(trainer))) and (
            metrics := self._run(trainer, pl_module)
        ):
            log_rank_identical(pl_module, metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fallback: training that stopped without passing an epoch end (nothing in this project)
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
