"""Per-epoch metrics on an epoch axis in W&B (added by train.py whenever a WandbLogger is used).

W&B plots against its own step counter by default; this tells it that the per-epoch metrics
(losses, accuracies, Hessian spectrum, robust accuracy, optimizer settings) have ``epoch`` as
their x axis, and keeps the last value of each in the run summary, so the runs table compares
runs without custom work.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

EPOCH_METRICS = (
    "train/*",
    "train_eval/*",
    "val/*",
    "test/*",
    "gen_gap/*",
    "hessian/*",
    "adv/*",
    "adv_full/*",
    "opt/*",
)


class WandbEpochAxis(pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.define_metric("epoch")
                for pattern in EPOCH_METRICS:
                    run.define_metric(pattern, step_metric="epoch", summary="last")
