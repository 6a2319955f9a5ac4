"""Mid-epoch checkpoints in a real Trainer: on optimizer steps only, and resumed at the exact batch.

A tiny float64 model whose weights depend on the order of the batches, trained with gradient
accumulation, momentum and a per-step learning-rate schedule; a crash inside an epoch, then a
resume from the last mid-epoch checkpoint, must end on the uninterrupted run's weights.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.mid_epoch_checkpoint import MidEpochCheckpoint
from lifecycle.build import build_callbacks
from lightning_modules.data import GlobalBatchSampler, ResumableLoader, restore_loader_states

N, BATCH, MICRO = 40, 8, 4  # 10 micro-batches per epoch, 2 per optimizer step: 5 steps per epoch
STEPS_PER_EPOCH = 5


class OrderSensitive(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 3, dtype=torch.float64))
        self.seen: list[list[int]] = []  # sample indices of every micro-batch trained on
        self.saves: list[tuple[int, int]] = []  # (global step, micro-batches of the epoch) per save

    def training_step(self, batch, batch_idx):
        (i,) = batch
        self.seen.append(i.tolist())
        x = torch.stack([torch.sin(i * 1.0), torch.cos(i * 0.7), torch.ones(len(i))], 1).double()
        return ((x @ self.w - torch.tanh(i * 0.3)) ** 2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)
        total = self.trainer.estimated_stepping_batches  # loads the train loader early (Lightning #20550)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - 0.8 * step / total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self):
        restore_loader_states(self.trainer)  # what SGDClassifier does

    def on_save_checkpoint(self, checkpoint):
        self.saves.append((self.global_step, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready))


class Killed(Exception):
    pass


class CrashAtStep(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed  # stands for a kill: no checkpoint is written on the way out


class WithValidation(OrderSensitive):
    def validation_step(self, batch, batch_idx):
        self.log("val/w", self.w.sum())


def fit(
    callbacks, ckpt_path=None, record: OrderSensitive | None = None, val: bool = False, **limits
) -> OrderSensitive:
    torch.manual_seed(0)
    module = record or (WithValidation() if val else OrderSensitive())
    trainer = pl.Trainer(
        accelerator="cpu",
        **(limits or {"max_epochs": 2}),
        accumulate_grad_batches=BATCH // MICRO,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    loader = ResumableLoader(  # as ImageDataModule.train_dataloader makes it
        TensorDataset(torch.arange(N)),
        batch_sampler=GlobalBatchSampler(N, BATCH, MICRO, 0, 1, seed=1),
        epoch_of=lambda: trainer.current_epoch,
    )
    val_loader = DataLoader(TensorDataset(torch.arange(4))) if val else None
    trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path)
    return module


def test_resumed_from_a_mid_epoch_checkpoint_ends_on_the_uninterrupted_weights(tmp_path):
    full = fit([])
    assert len(full.seen) == 2 * 2 * STEPS_PER_EPOCH and full.seen[:10] != full.seen[10:]

    every = lambda: MidEpochCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3)  # noqa: E731
    crashed = OrderSensitive()
    with pytest.raises(Killed):
        fit([every(), CrashAtStep(8)], record=crashed)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["global_step"] % STEPS_PER_EPOCH != 0  # inside epoch 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2

    resumed = fit([every()], ckpt_path=tmp_path / "last.ckpt")
    assert resumed.seen == full.seen[2 * 6 :]  # from the micro-batch after step 6 on, exactly
    assert torch.equal(resumed.w.detach(), full.w.detach())
    # after the resume at step 6 with accumulation, no save between the micro-batches of a step
    assert resumed.saves == [(9, 8)] and all(ready % 2 == 0 for _, ready in crashed.saves + resumed.saves)


@pytest.mark.parametrize("val", [True, False], ids=["with_validation", "without_validation"])
def test_a_max_steps_run_resumed_from_an_epoch_end_checkpoint_ends_on_the_uninterrupted_weights(
    tmp_path, val
):
    # with max_steps, Lightning restarts the finished epoch and its set_epoch runs one epoch
    # ahead afterwards; without validation it even fetches one more batch of the finished epoch
    limits = {"max_epochs": -1, "max_steps": 13}
    full = fit([], val=val, **limits)

    def callbacks():
        epoch_end = ModelCheckpoint(
            dirpath=tmp_path, filename="last", enable_version_counter=False, save_on_train_epoch_end=True
        )
        return [epoch_end, MidEpochCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3)]

    with pytest.raises(Killed):
        fit([*callbacks(), CrashAtStep(6)], val=val, **limits)  # before the save at step 6
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == STEPS_PER_EPOCH
    resumed = fit(callbacks(), ckpt_path=tmp_path / "last.ckpt", val=val, **limits)
    assert resumed.seen == full.seen[2 * STEPS_PER_EPOCH :] and len(resumed.seen) == 2 * 8
    assert torch.equal(resumed.w.detach(), full.w.detach())


def test_time_based_saves_follow_optimizer_steps_and_skip_the_epoch_end(tmp_path):
    module = fit([MidEpochCheckpoint(dirpath=str(tmp_path), every_n_minutes=1e-9)])
    # every step but the one at an epoch's last batch (5, 10), each right after the step
    assert module.saves == [(1, 2), (2, 4), (3, 6), (4, 8), (6, 2), (7, 4), (8, 6), (9, 8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_config_is_off_by_default_and_refuses_both_triggers(compose):
    by_type = {type(c).__name__: c for c in build_callbacks(compose([]))}
    off = by_type["MidEpochCheckpoint"]
    assert off._every_n_train_steps == 0 and off._train_time_interval is None and off._every_n_epochs == 0
    keys = [c.state_key for c in build_callbacks(compose([]))]
    assert len(keys) == len(set(keys))  # Lightning refuses two callbacks with one state key
    (on,) = [
        c
        for c in build_callbacks(compose(["callbacks.checkpoint_interval.every_n_train_steps=500"]))
        if isinstance(c, MidEpochCheckpoint)
    ]
    assert on._every_n_train_steps == 500 and on.filename == "last" and on.dirpath.endswith("checkpoints")
    timed = compose(["callbacks.checkpoint_interval.every_n_minutes=30"])
    (on,) = [c for c in build_callbacks(timed) if isinstance(c, MidEpochCheckpoint)]
    assert on._train_time_interval.total_seconds() == 1800
    both = [
        "callbacks.checkpoint_interval.every_n_minutes=30",
        "callbacks.checkpoint_interval.every_n_train_steps=5",
    ]
    with pytest.raises(ValueError, match="checkpoint_interval.every_n_minutes.*not both"):
        build_callbacks(compose(both))
    with pytest.raises(ValueError, match="checkpoint_interval.every_n_train_steps"):
        build_callbacks(compose(["callbacks.checkpoint_interval.every_n_train_steps=0"]))
