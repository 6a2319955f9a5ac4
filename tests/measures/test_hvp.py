"""Forward-over-reverse Hessian-vector products against double backward and the exact Hessian.

References: the double-backward products of :class:`HessianOperator` (a different autograd route:
``torch.autograd.grad`` twice, no torch.func), and for tiny networks the dense Hessian of
``torch.autograd.functional.hessian`` (:func:`tests.helpers.exact_hessian`). Everything in float64,
on the shipped models (``lightning_modules.models``) with tiny inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules import models
from measures.hessian import HessianOperator, fastest_hvp, hessian_eigenvalues
from measures.hvp import (
    CPU_BATCH_SIZE,
    HVP_MODES,
    _saved_bytes,
    auto_batch_size,
    batch_size_for_memory,
    check_hvp,
    forward_over_reverse_error,
)
from tests.helpers import exact_hessian

RTOL = 1e-8
LOSS = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_running_stats(net: nn.Module, seed: int = 5) -> nn.Module:
    """Non-trivial BatchNorm running statistics (eval mode then differs from train mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net


SHIPPED = {  # name -> (model, input shape): the shipped architectures at tiny input sizes
    "mlp": (lambda: models.mlp((1, 4, 4), 3, hidden=(8, 6)), (1, 4, 4)),
    "lenet": (lambda: models.lenet((1, 12, 12), 3), (1, 12, 12)),
    "c1": (lambda: models.c1((1, 8, 8), 3, channels=8, hidden=(12, 10)), (1, 8, 8)),
    "resnet20": (lambda: models.resnet20((3, 8, 8), 3), (3, 8, 8)),
}


def shipped(name: str) -> tuple[nn.Module, list]:
    """The model (float64, eval mode) and batches of 3, 2 and 0 samples (unequal, one empty)."""
    build, shape = SHIPPED[name]
    torch.manual_seed(0)
    net = with_running_stats(build()).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((5, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return net, [(x[:3], y[:3]), (x[3:], y[3:]), (x[:0], y[:0])]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def vectors(dim: int, n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(dim, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(SHIPPED))
def test_forward_over_reverse_equals_double_backward_on_the_shipped_models(name, mode):
    """matvec and matmat; in train mode (per-batch BatchNorm statistics) the buffers stay as found."""
    net, batches = shipped(name)
    net.train(mode == "train")
    before = buffers(net)
    db = HessianOperator(net, LOSS, batches, cache=True, hvp="double_backward")
    fr = HessianOperator(net, LOSS, batches, cache=True, hvp="forward_over_reverse")
    assert not fr.cached and fr.n_samples == db.n_samples == 5
    vs = vectors(db.dim, 3)
    ref = db.matmat(vs)
    assert relative(fr.matvec(vs[:, 0]), ref[:, 0]) <= RTOL
    assert relative(fr.matmat(vs), ref) <= RTOL
    assert fr.n_hvp == 4
    after = buffers(net)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert net.training == (mode == "train")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_over_reverse_equals_the_exact_hessian(mode):
    """A tiny C1 (BatchNorm) and MLP: every product equals the dense Hessian's, in either mode."""
    torch.manual_seed(2)
    nets = {
        "c1": with_running_stats(models.c1((1, 4, 4), 3, channels=2, hidden=(4, 3))).double(),
        "mlp": models.mlp((1, 2, 2), 3, hidden=(4,)).double(),
    }
    g = torch.Generator().manual_seed(3)
    for name, net in nets.items():
        net.train(mode == "train")
        x = torch.randn((6, 1, 4, 4) if name == "c1" else (6, 1, 2, 2), generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        # one batch: in train mode the statistics are those of the whole batch, as in the reference
        h = exact_hessian(net, LOSS, x, y)
        op = HessianOperator(net, LOSS, [(x, y)], hvp="forward_over_reverse")
        vs = vectors(op.dim, 2)
        assert relative(op.matmat(vs), h @ vs) <= RTOL, name


def test_frozen_parameters_excluded_and_unused_ones_zero():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    net = Net().double()
    net.a.bias.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((7, 4), generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    op = HessianOperator(net, LOSS, [(x[:4], y[:4]), (x[4:], y[4:])], hvp="forward_over_reverse")
    assert op.dim == 4 * 5 + 5 * 3 + 3 + 2 * 2 + 2
    v = vectors(op.dim, 1)[:, 0]
    hv = op.matvec(v)
    assert torch.equal(hv[-6:], torch.zeros(6, dtype=torch.float64))  # the unused layer
    h = exact_hessian(net, LOSS, x, y)
    assert relative(hv, h @ v) <= RTOL


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_forward_over_reverse_inside_no_grad_and_inference_mode(context):
    net, batches = shipped("c1")
    ref = hessian_eigenvalues(net, LOSS, batches, k=2, tol=1e-10)
    with torch.inference_mode() if context == "inference_mode" else torch.no_grad():
        made = [(x.clone(), y.clone()) for x, y in batches]  # inference tensors under inference mode
        got = hessian_eigenvalues(net, LOSS, made, k=2, tol=1e-10, hvp="forward_over_reverse")
    assert torch.allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-8, atol=0)


class CapturedStatistic(nn.Module):
    """A real pattern torch.func rejects: the forward writes an activation statistic into a plain
    tensor attribute (not a registered buffer), in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.mean_activation = torch.zeros(6, dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.mean_activation.copy_(h.detach().mean(0))
        return self.b(h)


def rejected_problem():
    torch.manual_seed(0)
    net = CapturedStatistic().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((6, 4), generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    return net, x, y


def test_a_model_torch_func_rejects_works_by_double_backward():
    net, x, y = rejected_problem()
    why = forward_over_reverse_error(net, LOSS, x[:2], y[:2])
    assert why is not None and "captured" in why and why.startswith("RuntimeError")
    with pytest.raises(RuntimeError, match="captured"):
        HessianOperator(net, LOSS, [(x, y)], hvp="forward_over_reverse").matvec(vectors(51, 1)[:, 0])
    op = HessianOperator(net, LOSS, [(x, y)], hvp="double_backward")
    v = vectors(op.dim, 1)[:, 0]
    assert relative(op.matvec(v), exact_hessian(net, LOSS, x, y) @ v) <= RTOL
    ok, _ = shipped("mlp")
    assert (
        forward_over_reverse_error(ok, LOSS, torch.randn(2, 1, 4, 4).double(), torch.tensor([0, 2])) is None
    )


def test_fastest_hvp_times_both_and_falls_back_with_the_reason():
    net, batches = shipped("lenet")
    choice = fastest_hvp(net, LOSS, batches)
    assert set(choice.ms) == set(HVP_MODES) and all(t > 0 for t in choice.ms.values())
    assert choice.mode == min(choice.ms, key=choice.ms.get) and choice.reason is None
    bad, x, y = rejected_problem()
    fallback = fastest_hvp(bad, LOSS, [(x, y)])
    assert fallback.mode == "double_backward" and set(fallback.ms) == {"double_backward"}
    assert "captured" in fallback.reason


def test_bad_hvp_values_are_refused_naming_the_allowed_ones():
    net, batches = shipped("mlp")
    for bad in ("auto", "fwd", None):
        with pytest.raises(ValueError, match="double_backward, forward_over_reverse"):
            check_hvp(bad)
        with pytest.raises(ValueError, match="double_backward, forward_over_reverse"):
            HessianOperator(net, LOSS, batches, hvp=bad)


def test_batch_size_from_memory_fills_the_given_share():
    """The batch whose saved bytes fit in the share of free memory, and not one much larger:
    checked against the bytes actually saved for batches of that size (linear in the batch)."""
    net, _ = shipped("c1")
    x = torch.randn(200, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (200,))
    per_sample = (_saved_bytes(net, LOSS, x[:40], y[:40]) - _saved_bytes(net, LOSS, x[:20], y[:20])) / 20
    free = _saved_bytes(net, LOSS, x[:50], y[:50]) / 0.25 + 0.5 * per_sample / 0.25
    b = batch_size_for_memory(net, LOSS, x, y, free, memory_fraction=0.25)
    assert b == 50
    assert batch_size_for_memory(net, LOSS, x, y, 1e18) == 200  # never more than the samples
    assert batch_size_for_memory(net, LOSS, x, y, 0.0) == 1
    assert auto_batch_size(net, LOSS, x, y) == CPU_BATCH_SIZE  # on a CPU


def test_train_mode_dropout_draws_the_masks_of_double_backward_and_leaves_the_state():
    """Dropout (train mode) next to train-mode BatchNorm: every product, lone or in a vmap block,
    sees the masks the cached double-backward graph was built with; RNG, .grad, buffers kept."""
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn((7, 1, 6, 6), generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    db = HessianOperator(net, LOSS, batches, cache=True)
    rng, before = torch.get_rng_state(), buffers(net)
    fr = HessianOperator(net, LOSS, batches, hvp="forward_over_reverse")
    vs = vectors(db.dim, 3)
    ref = db.matmat(vs)
    assert relative(fr.matmat(vs), ref) <= RTOL and relative(fr.matvec(vs[:, 1]), ref[:, 1]) <= RTOL
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[n], b) for n, b in buffers(net).items())
