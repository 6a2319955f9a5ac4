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


def test_an_evaluation_shares_no_metric_state_with_the_process_that_spawned_it():
    """``ddp_spawn`` sends the module through ``torch.multiprocessing``, which puts every CPU tensor
    into shared memory, the sender's too; Lightning copies parameters and buffers back out, not
    metric states. An evaluation in the receiving process must neither read what the sender's
    metrics hold (an earlier evaluation's sums) nor add into them."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    sender = _module(0)
    sender.eval_loss[0].update(torch.tensor(9.0), weight=50)  # left over from an earlier evaluation
    receiver = ForkingPickler.loads(ForkingPickler.dumps(sender))
    state = receiver.eval_loss[0].mean_value
    assert state.is_shared() and state.data_ptr() == sender.eval_loss[0].mean_value.data_ptr()

    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(receiver, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(receiver(x), y)
    assert abs(metrics["val/loss"] - expected.item()) <= 1e-6 * expected.item()
    assert sender.eval_loss[0].mean_value.item() == 450.0 and sender.eval_loss[0].weight.item() == 50.0
