"""Per-example input-space curvature against independent references (float64, tiny models).

References: each example's dense input Hessian by ``torch.autograd.functional.hessian`` of its own
loss + ``torch.linalg.eigvalsh``; the Gauss–Newton form Jᵀ(diag(p) − ppᵀ)J with J by
``torch.func.jacrev``. No product or Lanczos code of ours is in a reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from measures.input_curvature import batched_lanczos, input_curvature, input_hessian_products

D = 12  # input dimension: 3 x 2 x 2


def mlp(activation: type[nn.Module], seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(D, 16), activation()]
    if bn:
        layers.insert(2, nn.BatchNorm1d(16))
    layers += [nn.Linear(16, 16), activation(), nn.Linear(16, 4)]
    model = nn.Sequential(*layers).double()
    if bn:
        with torch.no_grad():
            model[2].running_mean.uniform_(-0.3, 0.3)
            model[2].running_var.uniform_(0.5, 2.0)
    return model.train()  # the measurement must switch to eval itself


def data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 2, 2), generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def dense_input_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, D, D): each example's own loss, differentiated twice in its own input."""
    model = copy.deepcopy(model).eval()
    out = []
    for xi, yi in zip(x, y, strict=True):

        def loss(flat, yi=yi, shape=xi.shape):
            return F.cross_entropy(model(flat.view(1, *shape)), yi.view(1))

        out.append(torch.autograd.functional.hessian(loss, xi.reshape(-1)))
    return torch.stack(out)


def gauss_newton(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D, D): Jᵀ(diag(p) − ppᵀ)J per example, J the logits' input Jacobian."""
    model = copy.deepcopy(model).eval()
    out = []
    for xi in x:
        f = lambda flat, shape=xi.shape: model(flat.view(1, *shape))[0]  # noqa: E731
        j = torch.func.jacrev(f)(xi.reshape(-1))
        p = torch.softmax(f(xi.reshape(-1)), 0)
        out.append(j.T @ (torch.diag(p) - torch.outer(p, p)) @ j)
    return torch.stack(out).detach()


@pytest.mark.parametrize("activation", [nn.Softplus, nn.Tanh, nn.GELU, nn.ReLU])
def test_per_example_eigenvalues_and_trace_equal_the_dense_input_hessian(activation):
    model, (x, y) = mlp(activation), data()
    dense = dense_input_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(dense)  # ascending
    result = input_curvature(model, x, y, k=3, tol=1e-12, max_iter=D)
    scale = exact.abs().amax(1)
    assert ((result.top - exact.flip(1)[:, :3]).abs().amax(1) <= 1e-8 * scale).all()
    assert ((result.smallest - exact[:, 0]).abs() <= 1e-8 * scale).all()
    trace = dense.diagonal(dim1=1, dim2=2).sum(1)
    assert ((result.trace - trace).abs() <= 1e-8 * trace.abs().clamp_min(1e-12)).all()
    assert bool(result.converged.all())


def test_a_relu_network_has_no_negative_input_curvature_and_its_hessian_is_the_gauss_newton_form():
    model, (x, y) = mlp(nn.ReLU), data(8)
    dense, ggn = dense_input_hessian(model, x, y), gauss_newton(model, x)
    assert torch.allclose(dense, ggn, rtol=1e-10, atol=1e-12)
    result = input_curvature(model, x, y, k=1, max_iter=D)
    assert (result.smallest >= -1e-10 * result.top[:, 0]).all()
    # the products themselves, against the Gauss-Newton matrices
    v = torch.randn((len(x), D), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    model.eval()
    hv = input_hessian_products(model, x, y)(v)
    assert torch.allclose(hv, torch.einsum("bij,bj->bi", ggn, v), rtol=1e-10, atol=1e-12)


def test_a_softplus_network_has_negative_input_curvature_that_the_gauss_newton_part_lacks():
    model, (x, y) = mlp(nn.Softplus), data(8)
    result = input_curvature(model, x, y, k=1, max_iter=D)
    ggn_min = torch.linalg.eigvalsh(gauss_newton(model, x))[:, 0]
    assert (ggn_min >= -1e-10 * result.top[:, 0]).all()  # the Gauss-Newton part is PSD...
    negative = result.negative(1e-3)
    assert bool(negative.any()), result.smallest  # ...the true Hessian is not
    assert (result.smallest[negative] < ggn_min[negative]).all()


def test_batched_recurrences_give_each_example_what_it_gets_alone():
    model, (x, y) = mlp(nn.Softplus, seed=2), data(6, seed=3)
    index = torch.arange(100, 106)
    together = input_curvature(model, x, y, index, k=2, trace=False, tol=1e-6)
    for i in range(len(x)):
        alone = input_curvature(
            model, x[i : i + 1], y[i : i + 1], index[i : i + 1], k=2, trace=False, tol=1e-6
        )
        assert torch.allclose(alone.top[0], together.top[i], rtol=1e-10, atol=0)
        assert torch.allclose(alone.smallest[0], together.smallest[i], rtol=1e-10, atol=1e-14)


def test_a_batchnorm_models_per_example_result_does_not_depend_on_the_other_examples():
    model, (x, y) = mlp(nn.Softplus, bn=True), data(6)
    x2, y2 = data(6, seed=9)
    x2[0], y2[0] = x[0], y[0]
    a = input_curvature(model, x, y, k=2, max_iter=D)
    b = input_curvature(model, x2, y2, k=2, max_iter=D)
    assert torch.allclose(a.top[0], b.top[0], rtol=1e-10) and torch.allclose(
        a.trace[0], b.trace[0], rtol=1e-10
    )


def test_the_model_is_left_as_found():
    model, (x, y) = mlp(nn.Tanh, bn=True), data()
    model(x)  # BN statistics move in train mode; the measurement must not move them
    before = copy.deepcopy(model.state_dict())
    input_curvature(model, x, y, k=1, max_iter=D)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_example_short_of_the_stopping_rule_is_flagged_unconverged():
    model, (x, y) = mlp(nn.Softplus), data(4)
    result = input_curvature(model, x, y, k=3, trace=False, tol=1e-12, max_iter=4)
    assert not bool(result.converged.any())


def test_batched_lanczos_on_known_matrices():
    g = torch.Generator().manual_seed(0)
    dim, b = 50, 3
    q, _ = torch.linalg.qr(torch.randn((b, dim, dim), generator=g, dtype=torch.float64))
    spectra = torch.stack([torch.linspace(-1, 10 * (i + 1), dim, dtype=torch.float64) for i in range(b)])
    mats = q @ torch.diag_embed(spectra) @ q.transpose(1, 2)
    eig = batched_lanczos(
        lambda v: torch.einsum("bij,bj->bi", mats, v), torch.arange(b), dim, k=2, smallest=1
    )
    assert bool(eig.converged.all())
    scale = spectra.abs().amax(1, keepdim=True)
    assert ((eig.eigenvalues - spectra.flip(1)[:, :2]).abs() <= 1e-4 * scale).all()
    assert ((eig.smallest - spectra[:, :1]).abs() <= 1e-4 * scale).all()
