"""Loss landscapes (measures.landscape) on tiny float64 models: curvature along eigenvectors equals
the eigenvalues, filter-normalized random curves equal the ``loss-landscapes`` package's, the model
is left bitwise as found, batch splits and 2 gloo processes give the 1-process arrays."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from measures.landscape import (
    eigen_directions,
    filter_normalize,
    flat_weights,
    loss_landscape,
    random_directions,
)
from tests.helpers import exact_hessian, run_in_process_group

N = 15
H = 1e-4  # finite-difference step: truncation ~H², rounding ~1e-16/H², both ~1e-8 here


def build(seed: int = 0):
    """A smooth float64 conv net with BatchNorm (eval), 51 weights, and 15 samples of 3 classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.1, 0.1)  # a zero entry would crash loss-landscapes (0/0, see below)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((N, 1, 6, 6), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def second_difference(values: torch.Tensor) -> float:
    return float((values[0] - 2 * values[1] + values[2]) / H**2)


def test_curvature_along_unit_eigenvectors_is_the_eigenvalue_and_the_plane_has_both():
    model, x, y = build()
    loss_fn = nn.CrossEntropyLoss()
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, x, y)).flip(0)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    dirs, lam = eigen_directions(model, loss_fn, batches, 2, tol=1e-12, stop="residual", max_iter=51)
    assert torch.allclose(lam, exact[:2], rtol=1e-9, atol=0)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(2, dtype=torch.float64), rtol=1e-12)
    grid = [-H, 0.0, H]
    for j in range(2):
        curve = loss_landscape(model, loss_fn, batches, dirs[j], [grid])
        assert second_difference(curve.loss) == pytest.approx(float(exact[j]), rel=1e-6)
    plane = loss_landscape(model, loss_fn, batches, dirs, [grid, grid], kind="eigen", normalization="unit")
    assert plane.loss.shape == (3, 3)
    assert second_difference(plane.loss[:, 1]) == pytest.approx(float(exact[0]), rel=1e-6)
    assert second_difference(plane.loss[1, :]) == pytest.approx(float(exact[1]), rel=1e-6)
    mixed = float((plane.loss[2, 2] - plane.loss[2, 0] - plane.loss[0, 2] + plane.loss[0, 0]) / (4 * H**2))
    assert abs(mixed) < 1e-6 * float(exact[0])  # v1ᵀ H v2 = 0
    # "weights" normalization: the same directions, scaled to the weights' norm
    big, _ = eigen_directions(
        model, loss_fn, batches, 2, normalization="weights", tol=1e-12, stop="residual", max_iter=51
    )
    assert torch.allclose(big, dirs * flat_weights(model).norm(), rtol=1e-10, atol=1e-14)


def test_filter_normalized_random_curve_equals_the_loss_landscapes_package():
    """The same direction and steps give the package's ``random_line`` curve to rounding.

    What differs between the package (0.6, ``loss_landscapes.main.random_line``) and Li et al. 2018
    as implemented here, shown by the assertions below:

    - its direction is uniform on [0, 1) (``rand_u_like``), not Gaussian: every entry positive;
    - its filter normalization matches ours on weights of 2+ dimensions (up to Li et al.'s +1e-10 in
      the denominator), but a 1-D parameter (bias, BatchNorm) ends up as ``|θ|`` elementwise (it
      normalizes the vector, then each scalar "filter"), where Li et al. use 0 (``biasbn``
      ignored, our default) or ``θ``;
    - it then rescales the whole direction so that each of its ``steps`` steps has length
      ``||θ|| / distance / steps``: larger ``distance``, shorter line, and the filter norms are lost
      up to a common factor;
    - it evaluates at steps 1..steps (one-sided, origin excluded), adding the step in place (the
      model is moved and left moved unless ``deepcopy_model=True``; ``requires_grad`` switched off);
    - a 1-D parameter with a zero entry (BatchNorm's bias at initialization) raises
      ``ZeroDivisionError`` in its filter normalization (0/0 for that scalar "filter").

    With the package's own direction passed to :func:`loss_landscape` at coordinates 1..steps the
    curves agree to float64 rounding of the accumulated in-place steps.
    """
    from loss_landscapes import random_line
    from loss_landscapes.metrics import Loss
    from loss_landscapes.model_interface.model_parameters import ModelParameters, rand_u_like

    model, x, y = build()
    loss_fn = nn.CrossEntropyLoss()
    distance, steps = 2.0, 12
    params = ModelParameters([p.detach().clone() for p in model.parameters()])
    torch.manual_seed(7)
    raw = rand_u_like(params)
    u = torch.cat([t.reshape(-1).clone() for t in raw.parameters])
    raw.filter_normalize_(params)
    theirs = torch.cat([t.reshape(-1) for t in raw.parameters])
    scale = (params.model_norm() / distance / steps) / raw.model_norm()

    ours = filter_normalize(u, model, one_dim="zero")
    two_d = torch.cat([torch.full((p.numel(),), p.dim() > 1) for p in model.parameters()])
    assert torch.allclose(ours[two_d], theirs[two_d], rtol=1e-9, atol=0)
    assert torch.equal(ours[~two_d], torch.zeros_like(ours[~two_d]))
    assert torch.allclose(theirs[~two_d], flat_weights(model)[~two_d].abs(), rtol=1e-12, atol=0)

    torch.manual_seed(7)  # the package draws the same direction from the global RNG
    package = random_line(
        model,
        Loss(loss_fn, x, y),
        distance=distance,
        steps=steps,
        normalization="filter",
        deepcopy_model=True,
    )
    coords = torch.arange(1, steps + 1, dtype=torch.float64)
    curve = loss_landscape(model, loss_fn, [(x, y)], theirs * scale, [coords])
    assert torch.allclose(curve.loss, torch.as_tensor(package), rtol=1e-12, atol=0)


def test_random_directions_are_seeded_filter_normalized_and_leave_the_global_rng():
    model, _, _ = build()
    state = torch.get_rng_state()
    d = random_directions(model, 2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(d, random_directions(model, 2, seed=3))
    assert not torch.equal(d[0], d[1])
    for p, part in zip(
        model.parameters(), torch.split(d[0], [p.numel() for p in model.parameters()]), strict=True
    ):
        part = part.view_as(p)
        if p.dim() > 1:
            assert torch.allclose(part.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-8)
        else:
            assert not part.any()
    copied = random_directions(model, 1, seed=3, one_dim="weights")[0]
    one_d = torch.cat([torch.full((p.numel(),), p.dim() <= 1) for p in model.parameters()])
    assert torch.equal(copied[one_d], flat_weights(model)[one_d])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_model_is_left_bitwise_as_found(mode):
    model, x, y = build()
    model.train()  # a training model with BN: the landscape must not update its running statistics
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = copy.deepcopy(model.state_dict(keep_vars=False))
    grad = model[0].weight.grad.clone()
    loss_fn = nn.CrossEntropyLoss()
    dirs, _ = eigen_directions(model, loss_fn, [(x, y)], 2, mode=mode, max_iter=20)
    loss_landscape(model, loss_fn, [(x, y)], dirs, [torch.linspace(-1, 1, 3)] * 2, mode=mode)
    loss_landscape(
        model, loss_fn, [(x, y)], random_directions(model, 1), [torch.linspace(-1, 1, 3)], mode=mode
    )
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, grad) and model[5].weight.grad is None


def test_unequal_batches_give_the_one_batch_values():
    model, x, y = build()
    loss_fn = nn.CrossEntropyLoss()
    dirs = random_directions(model, 2, seed=1)
    grid = [torch.linspace(-1, 1, 4), torch.linspace(-0.5, 0.5, 3)]
    one = loss_landscape(model, loss_fn, [(x, y)], dirs, grid)
    split = loss_landscape(
        model, loss_fn, [(x[:2], y[:2]), (x[2:9], y[2:9]), (x[9:9], y[9:9]), (x[9:], y[9:])], dirs, grid
    )
    assert torch.allclose(split.loss, one.loss, rtol=1e-13, atol=0)
    assert torch.equal(split.accuracy, one.accuracy)
    assert one.n_samples == N and one.loss.shape == (4, 3) and one.mode == "eval"


def _landscapes(rank, world, x_all=None, y_all=None):
    model, x, y = build()
    loss_fn = nn.CrossEntropyLoss()
    if world == 1:
        batches = [(x, y)]
    else:  # unequal shards, different batch sizes
        batches = [(x[:4], y[:4]), (x[4:9], y[4:9])] if rank == 0 else [(x[9:], y[9:])]
    dirs, lam = eigen_directions(model, loss_fn, batches, 2, max_iter=30)
    grid = [torch.linspace(-0.5, 0.5, 5)] * 2
    eigen = loss_landscape(model, loss_fn, batches, dirs, grid)
    rand = loss_landscape(model, loss_fn, batches, random_directions(model, 1, seed=4), grid[:1])
    return {"lam": lam, "eigen": eigen.loss, "eigen_acc": eigen.accuracy, "rand": rand.loss,
            "rand_acc": rand.accuracy, "n": eigen.n_samples}  # fmt: skip


def test_two_gloo_processes_give_the_one_process_arrays():
    r0, r1 = run_in_process_group(_landscapes, world_size=2)
    ref = _landscapes(0, 1)
    for key in r0:
        a, b = r0[key], r1[key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key  # same on both ranks
    assert r0["n"] == N
    assert torch.allclose(r0["lam"], ref["lam"], rtol=1e-10, atol=0)
    for key in ("eigen", "rand"):
        assert torch.allclose(r0[key], ref[key], rtol=1e-12, atol=0), key
        assert torch.equal(r0[key + "_acc"], ref[key + "_acc"]), key
