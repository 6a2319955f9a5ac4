"""When an ``EpochEndMeasurement`` measures: every n epochs, or every n optimizer steps."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.epoch_measurement import EpochEndMeasurement
from lightning_modules.config import ConfigError


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepRecorder(EpochEndMeasurement):
    def __init__(self, **kwargs):
        super().__init__(at_end=True, prefix="rec", **kwargs)
        self.steps: list[int] = []

    def measure_module(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        return {"rec/step": float(trainer.global_step)}


def measured_steps(batches_per_epoch: int, epochs: int, **schedule) -> list[int]:
    data = TensorDataset(torch.randn(batches_per_epoch * 4, 2), torch.randint(0, 2, (batches_per_epoch * 4,)))
    rec = StepRecorder(**schedule)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    return rec.steps


def test_every_n_steps_measures_at_the_first_epoch_end_past_each_multiple():
    # 3 steps per epoch, every 5 steps: multiples 5, 10, 15 are passed at the ends of epochs 2
    # (step 6), 4 (step 12) and 5 (step 15); the last epoch end (step 21) is measured by at_end
    assert measured_steps(3, 7, every_n_epochs=None, every_n_steps=5) == [6, 12, 15, 21]
    # a step count that lands on the multiple measures right there
    assert measured_steps(5, 3, every_n_epochs=None, every_n_steps=5) == [5, 10, 15]
    # an interval shorter than an epoch: once per epoch end, not once per multiple passed
    assert measured_steps(4, 2, every_n_epochs=None, every_n_steps=1) == [4, 8]


def test_every_n_epochs_is_unchanged():
    assert measured_steps(3, 5, every_n_epochs=2) == [6, 12, 15]


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ({"every_n_epochs": 2, "every_n_steps": 10}, "every_n_steps=10 is invalid: set exactly one"),
        ({"every_n_epochs": None, "every_n_steps": None}, "every_n_steps=None is invalid: set exactly one"),
        ({"every_n_epochs": None, "every_n_steps": 0}, "every_n_steps=0 is invalid: must be an integer >= 1"),
    ],
)
def test_a_schedule_must_be_exactly_one_positive_interval(schedule, match):
    with pytest.raises(ConfigError, match=match):
        StepRecorder(**schedule)
