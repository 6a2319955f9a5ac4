"""The LightningModule across a resume: float64 weights restored bit for bit."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules import models
from lightning_modules.config import SGDConfig
from lightning_modules.module import SGDClassifier


def _fit(module, loader, tmp_path, ckpt_path=None) -> None:
    pl.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_steps=2,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last", enable_version_counter=False)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader, ckpt_path=ckpt_path)


def _module(seed: int) -> SGDClassifier:
    torch.manual_seed(seed)
    net = models.mlp((1, 4, 4), 3, hidden=(8,), mean=[0.5], std=[0.25])
    return SGDClassifier(net, SGDConfig(batch_size=8, lr=0.1), num_classes=3)


def test_a_float64_run_resumes_with_its_float64_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 1, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    _fit(_module(0), DataLoader(data, batch_size=8), tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    weights = [v for k, v in saved.items() if k.startswith("net.body")]
    assert all(w.dtype == torch.float64 and not torch.equal(w, w.float().double()) for w in weights)

    resumed = _module(1)  # other initial weights: everything must come from the checkpoint
    _fit(resumed, DataLoader(data, batch_size=8), tmp_path, ckpt_path=tmp_path / "last.ckpt")
    state = resumed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items()), "weights rounded on the way in"
