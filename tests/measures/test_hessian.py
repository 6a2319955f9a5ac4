"""Hessian eigenvalues / trace / density against an exact dense Hessian of tiny networks.

Reference: the loss as a function of the flat parameter vector (``torch.func.functional_call``),
its dense Hessian by ``torch.autograd.functional.hessian`` and ``torch.linalg.eigvalsh``: an
independent route (no Lanczos, no HVP code of ours).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from measures.estimators import hutchinson_trace
from measures.hessian import (
    HessianOperator,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)
from measures.linalg import DEFAULT_TOL, RESIDUAL_TOL
from measures.operators import MatrixOperator
from tests.helpers import exact_hessian

SIZES = (7, 5, 3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP hand-offs between 2 threads cost more than the work (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # unequal batches: the loss must be weighted by samples, not by batches


def mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def convnet(dtype=torch.float64) -> nn.Module:
    """conv 1->2, BatchNorm (eval, non-trivial running stats), ReLU, pool, linear -> 3 classes."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).to(dtype)
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2]))
        net[1].running_var.copy_(torch.tensor([0.5, 2.0]))
        net[1].weight.copy_(torch.tensor([1.5, 0.7]))
    return net.eval()


def data(shape, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    x = torch.randn((n, *shape), generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    bounds = [0, *torch.tensor(SIZES).cumsum(0).tolist()]
    return x, y, [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture(scope="module", params=["mlp", "conv"])
def problem(request):
    model, shape = (mlp(), (5,)) if request.param == "mlp" else (convnet(), (1, 6, 6))
    loss_fn = nn.CrossEntropyLoss()
    x, y, batches = data(shape)
    h = exact_hessian(model, loss_fn, x, y)
    return model, loss_fn, batches, h, torch.linalg.eigvalsh(h)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("tol", [DEFAULT_TOL, 1e-9])
def test_top3_and_smallest_reach_the_promised_error(problem, cache, tol):
    """Every reported eigenvalue within tol·|λ_1| of the exact one, and each estimated error at
    least the true one (the estimate a user reads as hessian/rel_error)."""
    model, loss_fn, batches, _, exact = problem
    r = hessian_eigenvalues(model, loss_fn, batches, k=3, smallest=1, cache=cache, tol=tol)
    scale = float(exact.abs().max())
    true = torch.cat([(r.eigenvalues - exact.flip(0)[:3]).abs(), (r.smallest - exact[:1]).abs()])
    estimated = torch.cat([r.errors, r.smallest_errors])
    assert r.converged
    assert torch.all(r.eigenvalues[:-1] >= r.eigenvalues[1:])
    assert float(true.max()) <= tol * scale
    assert torch.all(true <= estimated), (true, estimated)
    assert r.rel_error <= tol and r.rel_error >= float(true.max()) / scale
    assert r.residuals.shape == (3,) and r.smallest_residuals.shape == (1,)
    assert r.n_hvp == r.n_iter and r.n_hvp < len(exact)  # cheaper than forming H


def test_the_eigenvalue_stop_takes_fewer_products_than_the_former_residual_stop(problem):
    model, loss_fn, batches, _, exact = problem
    new = hessian_eigenvalues(model, loss_fn, batches, k=3, smallest=1)
    old = hessian_eigenvalues(model, loss_fn, batches, k=3, smallest=1, tol=RESIDUAL_TOL, stop="residual")
    assert new.n_hvp < old.n_hvp
    assert float((new.eigenvalues - exact.flip(0)[:3]).abs().max()) <= DEFAULT_TOL * float(exact.abs().max())


def test_eigenvectors_and_residuals_are_honest(problem):
    model, loss_fn, batches, h, _ = problem
    r = hessian_eigenvalues(model, loss_fn, batches, k=2, return_eigenvectors=True)
    v = r.eigenvectors
    assert v.shape == (len(h), 2)
    true_res = (h @ v - v * r.eigenvalues).norm(dim=0)
    assert torch.allclose(true_res, r.residuals, rtol=0.1, atol=1e-9)


def test_magnitude_and_weighting(problem):
    """which='magnitude' follows |λ|; an unweighted batch mean gives a different answer."""
    model, loss_fn, batches, _, exact = problem
    r = hessian_eigenvalues(model, loss_fn, batches, k=2, which="magnitude")
    ref = exact[exact.abs().argsort(descending=True)[:2]]
    assert torch.allclose(r.eigenvalues, ref, rtol=1e-6)
    # sanity: the test data can tell sample weighting from batch weighting
    per_batch = [hessian_eigenvalues(model, loss_fn, [b], k=1).eigenvalues[0] for b in batches]
    assert abs(float(sum(per_batch) / 3 - exact[-1])) > 1e-4 * abs(float(exact[-1]))


@pytest.mark.parametrize("cache", [True, False])
def test_trace_within_three_stderr(problem, cache):
    model, loss_fn, batches, h, _ = problem
    r = hessian_trace(model, loss_fn, batches, rtol=0.05, max_samples=300, seed=3, cache=cache)
    assert r.n_hvp == r.n_samples >= 10
    assert r.stderr > 0
    assert abs(r.trace - float(h.trace())) <= 3 * r.stderr


def test_power_method_top1_roughly(problem):
    model, loss_fn, batches, _, exact = problem
    r = hessian_eigenvalues(model, loss_fn, batches, k=1, method="power", max_iter=300)
    top_mag = float(exact[exact.abs().argmax()])
    assert abs(float(r.eigenvalues[0]) - top_mag) <= 1e-2 * abs(top_mag)


def test_density_sums_to_one_and_matches_moments(problem):
    model, loss_fn, batches, h, exact = problem
    d = hessian_density(model, loss_fn, batches, n_steps=len(exact), n_vectors=4, seed=1)
    assert torch.allclose(d.weights.sum(1), torch.ones(4, dtype=torch.float64))
    assert float(d.nodes.max()) == pytest.approx(float(exact[-1]), rel=1e-6)
    # quadrature of f(t)=t estimates tr(H)/dim
    est_mean = float((d.nodes * d.weights).sum(1).mean())
    assert est_mean == pytest.approx(float(h.trace()) / len(exact), abs=0.5 * float(exact.abs().max()))
    grid = torch.linspace(float(exact[0]) - 1, float(exact[-1]) + 1, 2001)
    mass = float(d.density(grid).sum() * (grid[1] - grid[0]))
    assert mass == pytest.approx(1.0, abs=1e-2)


def _state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        torch.get_rng_state(),
    )


def _assert_same_state(before, after):
    assert before[0] == after[0]
    for n, g in before[1].items():
        assert (g is None) == (after[1][n] is None), n
        assert g is None or torch.equal(g, after[1][n]), n
    for n, b in before[2].items():
        assert torch.equal(b, after[2][n]), n
    assert before[3] == after[3]
    assert torch.equal(before[4], after[4])


@pytest.mark.parametrize("preset_grad", [False, True])
def test_model_state_untouched(preset_grad):
    """Train-mode BN + dropout: modes, .grad, running stats, requires_grad and RNG survive."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    model.train()
    model[0].eval()  # a mixed-mode model must stay mixed
    model[0].bias.requires_grad_(False)
    if preset_grad:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    _, _, batches = data((1, 6, 6))
    before = _state(model)
    loss_fn = nn.CrossEntropyLoss()
    a = hessian_eigenvalues(model, loss_fn, batches, k=2, cache=True)
    b = hessian_eigenvalues(model, loss_fn, batches, k=2, cache=False)
    hessian_trace(model, loss_fn, batches, max_samples=20)
    hessian_density(model, loss_fn, batches, n_steps=5)
    _assert_same_state(before, _state(model))
    # same dropout masks and batch statistics for every product, cached or not
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)


def test_frozen_parameters_excluded():
    model = mlp()
    model[0].weight.requires_grad_(False)
    _, _, batches = data((5,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, cache=True)
    assert op.dim == 6 + 6 * 3 + 3
    assert op.n_samples == sum(SIZES)


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_works_without_grad_mode(context):
    model = convnet()
    loss_fn = nn.CrossEntropyLoss()
    x, y, _ = data((1, 6, 6))
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, x, y))
    ctx = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with ctx:
        xi, yi = x.clone(), y.clone()  # created inside inference mode: not saveable for backward
        batches = [(xi[:9], yi[:9]), (xi[9:], yi[9:])]
        r = hessian_eigenvalues(model, loss_fn, batches, k=1, smallest=1)
        t = hessian_trace(model, loss_fn, batches, max_samples=20)
    assert math.isfinite(t.trace)
    assert torch.allclose(r.eigenvalues[0], exact[-1], rtol=DEFAULT_TOL)
    assert torch.allclose(r.smallest[0], exact[0], rtol=0, atol=DEFAULT_TOL * float(exact[-1]))


def test_float32_model():
    model64 = mlp()
    model = mlp(torch.float32)
    x, y, batches64 = data((5,))
    exact = torch.linalg.eigvalsh(exact_hessian(model64, nn.CrossEntropyLoss(), x, y))
    batches = [(bx.float(), by) for bx, by in batches64]
    r = hessian_eigenvalues(model, nn.CrossEntropyLoss(), batches, k=3, tol=1e-4)
    assert r.eigenvalues.dtype == torch.float64
    assert torch.allclose(r.eigenvalues, exact.flip(0)[:3], rtol=1e-4)


def test_matvec_matches_dense(problem):
    model, loss_fn, batches, h, _ = problem
    op = HessianOperator(model, loss_fn, batches, cache=True)
    vs = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op.matvec(vs[:, 0]), h @ vs[:, 0], rtol=1e-10, atol=1e-12)
    block = torch.stack([op.matvec(vs[:, j]) for j in range(3)], dim=1)
    assert torch.allclose(block, h @ vs, rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 4


@pytest.mark.parametrize("cache", [True, False])
def test_batched_products_match_dense_and_count(problem, cache):
    """matmat: several vectors in one batched second backward, the same as one by one."""
    model, loss_fn, batches, h, _ = problem
    op = HessianOperator(model, loss_fn, batches, cache=cache)
    vs = torch.randn(op.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(op.matmat(vs), h @ vs, rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 4
    with pytest.raises(ValueError, match="shape"):
        op.matmat(vs[:-1])
    # Hutchinson's blocks go through it: same samples, same estimate as the vector-by-vector route
    blocked = hutchinson_trace(op, rtol=0.05, max_samples=40, block=4, seed=1)
    single = hutchinson_trace(MatrixOperator(h), rtol=0.05, max_samples=40, block=4, seed=1)
    assert blocked.n_hvp == single.n_hvp and torch.allclose(blocked.samples, single.samples, rtol=1e-9)


def test_auto_cache_falls_back_when_memory_is_short(problem):
    model, loss_fn, batches, h, _ = problem
    fits = HessianOperator(model, loss_fn, batches, cache="auto")
    short = HessianOperator(model, loss_fn, batches, cache="auto", cache_memory_fraction=1e-12)
    assert fits.cached and not short.cached
    v = torch.randn(short.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(short.matvec(v), h @ v, rtol=1e-10, atol=1e-12)


def test_rejects_bad_arguments():
    model = mlp()
    _, _, batches = data((5,))
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, nn.CrossEntropyLoss(), batches, method="arnoldi")
    with pytest.raises(ValueError, match="no samples"):
        hessian_eigenvalues(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(ValueError, match="cache"):
        HessianOperator(model, nn.CrossEntropyLoss(), batches, cache="yes")
