"""A user's own measurement, outside the framework's packages (selected with ``+callbacks.user._target_=...``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from callbacks.epoch_measurement import EpochEndMeasurement


class WeightNorm(EpochEndMeasurement):
    """The global L2 norm of the weights at epoch ends (as in the README's "Adding a callback").

    Args:
        every_n_epochs, at_end, prefix: when to measure, and the metric namespace.
    """

    def __init__(self, every_n_epochs: int = 1, at_end: bool = True, prefix: str = "weights"):
        super().__init__(every_n_epochs, at_end, prefix)

    def measure_module(self, trainer, pl_module):
        norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in pl_module.parameters()))
        return {f"{self.prefix}/l2_norm": float(norm)}


class SlowEpochs(pl.Callback):
    """Sleeps ``seconds`` at every epoch end: a job whose length does not depend on the machine's load.

    Args:
        seconds: how long each epoch end waits.
    """

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)
