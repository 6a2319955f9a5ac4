"""The device checks: each test runs on every device this machine has (the CPU; a GPU where there is
one), in float64, against an independent reference computed on the CPU.

On CI (no GPU) they run on the CPU; ``benchmarks/gpu_check.py`` runs them on the GPU with
``-k cuda`` (so test names must not contain the words "cpu" or "cuda": the device is the parameter).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.datasets import ImageTensorDataset
from lightning_modules.loaders import DeviceLoader, GlobalBatchSampler, ResumableLoader
from lightning_modules.module import SGDClassifier, SGDConfig
from measures.attacks import AttackSpec, robust_masks
from measures.hessian import HessianOperator, hessian_eigenvalues
from tests.helpers import attack_data, exact_hessian, small_cnn

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
HOST = torch.device("cpu")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12 * 12, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def test_hessian_top3_equals_the_dense_hessian(device):
    """Lanczos on the device, float64, BatchNorm in eval mode = eigvalsh of the dense CPU Hessian."""
    net, (x, y), loss = (
        small_cnn(dtype=torch.float64),
        attack_data(24, dtype=torch.float64),
        nn.CrossEntropyLoss(),
    )
    exact = torch.linalg.eigvalsh(exact_hessian(net, loss, x, y)).flip(0)[:3]
    got = hessian_eigenvalues(net.to(device), loss, [(x[:10].to(device), y[:10].to(device)),
                              (x[10:].to(device), y[10:].to(device))], k=3, tol=1e-10)  # fmt: skip
    torch.testing.assert_close(got.eigenvalues.cpu(), exact, rtol=1e-8, atol=1e-10)


def test_sgd_steps_equal_a_hand_written_update_on_the_host(device):
    """Five torch.optim.SGD steps with momentum on the device = the update written out by hand on the
    host (buf = m * buf + g; p -= lr * buf), gradients by autograd, float64."""
    x, y = attack_data(40, dtype=torch.float64)
    lr, m = 0.1, 0.9
    net = tiny_mlp().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=m)
    ref = tiny_mlp()
    bufs = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(5):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb.to(device)), yb.to(device)).backward()
        opt.step()
        grads = torch.autograd.grad(nn.functional.cross_entropy(ref(xb), yb), list(ref.parameters()))
        with torch.no_grad():
            for p, g, b in zip(ref.parameters(), grads, bufs, strict=True):
                b.mul_(m).add_(g) if i else b.copy_(g)
                p.sub_(lr * b)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-10, atol=1e-12)


def test_robust_masks_equal_the_host_reference(device):
    """FGSM, PGD and APGD-CE robust/broken per sample on the device, in one batch = on the host in
    batches of 7 (each sample's start depends on its index only; float64)."""
    net, (x, _) = small_cnn(dtype=torch.float64), attack_data(48, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)  # the model's own labels: every sample correct at clean, some robust
    specs = [AttackSpec("fgsm", 0.01), AttackSpec("pgd", 0.01, steps=5), AttackSpec("apgdce", 0.01, steps=10)]
    idx = torch.arange(len(x))
    ours = robust_masks(net.to(device), x.to(device), y.to(device), idx.to(device), specs)
    host = small_cnn(dtype=torch.float64)
    parts = [
        robust_masks(host, x[i : i + 7], y[i : i + 7], idx[i : i + 7], specs) for i in range(0, len(x), 7)
    ]
    ref = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    assert set(ours) == set(ref)
    for key, mask in ref.items():
        assert torch.equal(ours[key].cpu(), mask), key
    assert 0 < int(ref["pgd_linf_eps0.01"].sum()) < int(ref["clean"].sum())  # the attack did something


def test_lightning_training_on_the_device_equals_a_plain_loop_on_the_host(device):
    """Two epochs of the project's LightningModule through a Trainer on the device (64-true) = a plain
    torch loop on the host with the same batches and SGD: every weight, to float64 rounding."""
    x, y = attack_data(64, dtype=torch.float64)
    module = SGDClassifier(tiny_mlp().float(), SGDConfig(batch_size=16, lr=0.05, momentum=0.9))
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=2, precision="64-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x.float(), y), batch_size=16))
    ref = tiny_mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for i in range(0, 64, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x[i : i + 16].float().double()), y[i : i + 16]).backward()
            opt.step()
    for a, b in zip(module.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-11)


def test_forward_over_reverse_equals_double_backward(device):
    """The two Hessian-vector product modes on the device, float64, eval-mode BatchNorm: equal, and
    equal to the dense CPU Hessian times the vector."""
    net, (x, y), loss = (
        small_cnn(dtype=torch.float64),
        attack_data(20, dtype=torch.float64),
        nn.CrossEntropyLoss(),
    )
    dense = exact_hessian(net, loss, x, y)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batches = [(x[:8].to(device), y[:8].to(device)), (x[8:].to(device), y[8:].to(device))]
    net = net.to(device)
    for mode in ("double_backward", "forward_over_reverse"):
        hv = HessianOperator(net, loss, batches, hvp=mode).matvec(v.to(device)).cpu()
        torch.testing.assert_close(hv, dense @ v, rtol=1e-9, atol=1e-11, msg=mode)


def test_device_loader_gathers_the_dataloader_batches(device):
    """``data.on_device``: batches gathered from the split's tensors on the device = the DataLoader's
    batches on the host, every batch of two epochs, with random crops and flips."""
    g = torch.Generator().manual_seed(7)
    ds = ImageTensorDataset(torch.randint(0, 256, (37, 1, 6, 5), dtype=torch.uint8, generator=g), torch.arange(37),
                            augment="crop_flip", crop_padding=2)  # fmt: skip
    host = ResumableLoader(ds, batch_sampler=GlobalBatchSampler(37, 8, 8, 0, 1, seed=5))
    placed = DeviceLoader(ds.to(device), GlobalBatchSampler(37, 8, 8, 0, 1, seed=5))
    batches = {}
    for name, loader in (("host", host), ("device", placed)):
        torch.manual_seed(0)
        batches[name] = []
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            batches[name] += list(loader)
    assert len(batches["host"]) == len(batches["device"]) == 10
    for (xa, ya), (xb, yb) in zip(batches["host"], batches["device"], strict=True):
        assert xb.device.type == device.type
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
