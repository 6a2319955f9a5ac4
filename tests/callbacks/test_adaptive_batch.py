"""AdaptiveBatch (ABS / ABSA) in-process: accumulation, lr composed with the optimizer's schedule,
the FGSM share of each micro-batch, and its settings refused before training."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from callbacks.adaptive_batch import AdaptiveBatch
from lightning_modules.config import AdversarialTraining, ConfigError, SGDConfig
from lightning_modules.data import DATASETS, ImageDataModule
from lightning_modules.models import mlp
from lightning_modules.module import SGDClassifier


class Recorder(pl.Callback):
    """Per optimizer step: (epoch, accumulation, lr); per epoch: the adversarial ratio in force."""

    def __init__(self):
        self.steps, self.adv = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            (trainer.current_epoch, trainer.accumulate_grad_batches, optimizer.param_groups[0]["lr"])
        )

    def on_train_epoch_start(self, trainer, pl_module):
        s = pl_module.adv_schedule
        self.adv.append(0.0 if s is None else s.fraction)


def fit(callback: AdaptiveBatch, sgd: SGDConfig, epochs: int, batch: int = 500, tmp_path=None):
    torch.manual_seed(0)
    info = DATASETS["mnist5k"]
    net = mlp(info.input_shape, 10, hidden=(16,), mean=info.mean, std=info.std)
    dm = ImageDataModule("mnist5k", batch_size=batch, eval_batch_size=1000)
    callback.check_against(net, dm)
    module = SGDClassifier(net, sgd)
    rec = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[callback, rec],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    return rec, trainer, module


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
def test_batch_doubles_by_accumulation_and_lr_composes_with_a_step_schedule(rule, tmp_path):
    sgd = SGDConfig(batch_size=500, lr=0.05, schedule="step", step_epochs=2, gamma=0.5)
    cb = AdaptiveBatch(duration=1, max_batch_size=2000, lr_scaling=rule)
    rec, trainer, module = fit(cb, sgd, epochs=4, tmp_path=tmp_path)
    per_epoch = {}
    for epoch, acc, lr in rec.steps:
        per_epoch.setdefault(epoch, []).append((acc, lr))
    # 4000 images: 8 batches of 500 -> 8, 4, 2, 2 optimizer steps at 500, 1000, 2000, 2000
    assert [len(per_epoch[e]) for e in range(4)] == [8, 4, 2, 2]
    assert [per_epoch[e][0][0] for e in range(4)] == [1, 2, 4, 4]
    m = {"linear": 2.0, "sqrt": math.sqrt(2), "none": 1.0}[rule]
    scale = [1, m, m * m, m * m]
    for e in range(4):
        expected = 0.05 * 0.5 ** (e // 2) * scale[e]
        assert [lr for _, lr in per_epoch[e]] == pytest.approx([expected] * len(per_epoch[e]), rel=1e-12)
    assert trainer.global_step == 16 and module.batch_lr_scale == pytest.approx(m * m)
    assert trainer.callback_metrics["abs/batch_size"] == 2000
    assert trainer.callback_metrics["opt/batch_size"] == 2000  # the batch in use, not the base 500
    assert trainer.callback_metrics["abs/optimizer_steps"] == 16
    assert trainer.callback_metrics["abs/samples"] == 16000


def test_absa_ratio_halves_at_each_doubling_and_stops_at_half_the_epochs(tmp_path):
    sgd = SGDConfig(batch_size=250, lr=0.05)
    cb = AdaptiveBatch(adversarial=True, duration=1, max_batch_size=4000, adv_ratio=0.2)
    rec, _, _ = fit(cb, sgd, epochs=6, batch=250, tmp_path=tmp_path)
    # 0.2, 0.1, 0.05 in epochs 0-2; from epoch 3 = 6/2 on: none
    assert rec.adv == pytest.approx([0.2, 0.1, 0.05, 0.0, 0.0, 0.0])
    cb = AdaptiveBatch(adversarial=True, duration=1, max_batch_size=4000, adv_ratio=0.02)
    rec, _, _ = fit(cb, sgd, epochs=2, batch=250, tmp_path=tmp_path)
    assert rec.adv == [0.02, 0.0]  # 0.01 <= 1/250 after the first doubling; 0.02 > 1/250


@pytest.mark.parametrize(("ratio", "n"), [(0.2, 32), (0.1, 32), (0.05, 16), (0.3, 10)])
def test_absa_replaces_exactly_the_floor_of_ratio_times_micro_batch(ratio, n):
    torch.manual_seed(0)
    info = DATASETS["mnist5k"]
    module = SGDClassifier(mlp(info.input_shape, 10, hidden=(16,)), SGDConfig())
    module.adv_schedule = AdversarialTraining(enabled=True, attack="fgsm", eps=0.005, fraction=ratio)
    x, y = torch.rand(n, *info.input_shape) * 0.9 + 0.05, torch.randint(0, 10, (n,))
    out = module._adversarial_batch(x, y, 0, module.adv_schedule)
    changed = (out != x).flatten(1).any(1)
    k = int(ratio * n + 1e-9)
    assert changed[:k].all() and not changed[k:].any()
    assert (out - x).abs().max() <= 0.005 + 1e-7


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_batch_size": 16}, "max_batch_size"),
        ({"max_batch_size": 96}, "max_batch_size"),
        ({"max_batch_size": 8192}, "max_batch_size"),
        ({"adv_ratio": 1.5}, "adv_ratio"),
        ({"adv_ratio": -0.1}, "adv_ratio"),
        ({"duration": 0}, "duration"),
        ({"trigger": 1.0}, "trigger"),
        ({"lr_scaling": "cube"}, "lr_scaling"),
        ({"policy": "gns"}, "policy"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(kwargs, key):
    dm = ImageDataModule("mnist5k", batch_size=32)
    with pytest.raises(ConfigError) as err:
        AdaptiveBatch(**kwargs).check_against(None, dm)
    assert err.value.key == key


def test_default_cap_is_128_base_batches_fitted_to_the_training_set():
    assert AdaptiveBatch().resolve(32, 4000) == 2048
    assert AdaptiveBatch().resolve(128, 10**6) == 128 * 128


def test_noise_scale_policy_sets_the_batch_from_the_epochs_estimate(tmp_path):
    from measures.batch_schedule import noise_batch

    class Logged(AdaptiveBatch):
        rows: list = []

        def on_train_epoch_end(self, trainer, pl_module):
            before = self.state.batch_size
            super().on_train_epoch_end(trainer, pl_module)
            b_noise = float(trainer.callback_metrics["abs/noise_scale"])
            self.rows.append((before, b_noise, self.state.batch_size, int(self._sums[2])))

    cb = Logged(policy="noise_scale", max_batch_size=2000)
    rec, trainer, module = fit(cb, SGDConfig(batch_size=250, lr=0.05), epochs=3, batch=250, tmp_path=tmp_path)
    accs = [{a for e, a, _ in rec.steps if e == epoch} for epoch in range(3)]
    assert accs[0] == {1}  # epoch 0: one micro-batch a step, consecutive steps paired (15 pairs of 16)
    assert cb.rows[0][3] == 15
    for (before, b_noise, after, n), acc in zip(cb.rows, accs, strict=True):
        assert math.isfinite(b_noise) and n > 0
        assert after == min(max(before, noise_batch(b_noise, 250, 2000)), 2000)
        assert acc == {before // 250}  # the batch of the epoch, by accumulation
    assert cb.state.lr_scale == pytest.approx(cb.state.batch_size / 250)
