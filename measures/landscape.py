"""The loss (and accuracy) of a model along directions in parameter space: pure torch.

A landscape is the loss of the sample-weighted mean over a fixed set of samples,

    L(a) = (1/N) Σ_b n_b · loss_fn(model_{θ + Σ_j a_j d_j}(x_b), y_b),

on a grid of coordinates ``a`` (one axis: a curve; two: a surface) around the weights ``θ``, for
directions ``d_j`` in the space of the trainable parameters (flattened in ``model.parameters()``
order, as :class:`measures.hessian.HessianOperator` flattens them):

- :func:`eigen_directions`: the top Hessian eigenvectors (the framework's Lanczos,
  :func:`measures.hessian.hessian_eigenvalues`), scaled to unit length (``"unit"``: the coordinate
  is the Euclidean step, and the curvature of ``L`` at 0 along it is the eigenvalue) or to the
  norm of the weights (``"weights"``: coordinate 1 moves the weights by their own norm);
- :func:`random_directions`: Gaussian directions, filter-normalized as in Li et al. 2018
  (:func:`filter_normalize`: each filter, i.e. each slice along the first dimension of a weight
  of two or more dimensions, gets the norm of the same filter of the weights; biases and
  BatchNorm parameters get zero, Li et al.'s ``--xignore biasbn``, or the weights themselves);
- :func:`loss_landscape`: the loss and accuracy on the grid, as a :class:`Landscape`.

The model is never written: each point is evaluated with ``torch.func.functional_call`` on the
moved parameters, under :func:`~measures.module_state.preserved_module_state` in ``mode``
("eval" by default: BatchNorm uses its running statistics, which stay untouched; the mode is
recorded in the result). Batches may differ in size (sums weighted by sample count, exact).
Under ``torch.distributed`` each rank evaluates every point on its own shard of the samples and
the sums of all points are all-reduced once (see :mod:`measures.distributed`): every rank runs
the same points and the same collective, and ends with the same arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from measures.distributed import ProcessGroup, all_reduce_sum
from measures.hessian import Batches, LossFn, hessian_eigenvalues
from measures.module_state import preserved_module_state

__all__ = [
    "EIGEN_NORMALIZATIONS",
    "Landscape",
    "eigen_directions",
    "filter_normalize",
    "flat_weights",
    "loss_landscape",
    "random_directions",
]


EIGEN_NORMALIZATIONS = ("unit", "weights")
"""How eigenvector directions are scaled: unit length, or the norm of the weights."""

ONE_DIM = ("zero", "weights")
"""Random directions' entries for 1-D parameters (biases, BatchNorm): zero, or the weights."""


@dataclass
class Landscape:
    """Loss and accuracy on a grid of coordinates along one or two directions.

    Attributes:
        coords: one coordinate vector per direction (float64).
        loss: the sample-weighted mean loss, shape ``(len(coords[0]),)`` or
            ``(len(coords[0]), len(coords[1]))`` (first index: the first direction).
        accuracy: the fraction of correct argmax predictions, same shape.
        kind: "eigen" (Hessian eigenvectors), "random" (filter-normalized) or "given".
        normalization: "unit" | "weights" (eigen), "filter" (random), "given".
        eigenvalues: the directions' Hessian eigenvalues (eigen), else None.
        direction_norms: the Euclidean norm of each direction.
        weight_norm: the Euclidean norm of the trainable weights at the origin.
        mode: the train/eval mode the model was evaluated in.
        n_samples: samples summed over (all ranks).
    """

    coords: list[torch.Tensor]
    loss: torch.Tensor
    accuracy: torch.Tensor
    kind: str
    normalization: str
    direction_norms: torch.Tensor
    weight_norm: float
    mode: str
    n_samples: int
    eigenvalues: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True")
    return named


def flat_weights(model: nn.Module) -> torch.Tensor:
    """The trainable parameters, flattened in ``model.parameters()`` order (a detached copy)."""
    return torch.cat([p.detach().reshape(-1) for _, p in _trainable(model)])


def filter_normalize(direction: torch.Tensor, model: nn.Module, one_dim: str = "zero") -> torch.Tensor:
    """Li et al. 2018's filter normalization of a flat direction, returned as a new flat tensor.

    For a parameter of two or more dimensions, each filter ``d[f]`` (slice along the first
    dimension: an output channel of a convolution, a row of a linear layer) is scaled to
    ``||θ[f]|| / ||d[f]||`` (Li et al. add 1e-10 to the denominator; so does this). A
    one-dimensional parameter (bias, BatchNorm weight or bias) is set to zero (``one_dim="zero"``,
    Li et al.'s recommended ``--xignore biasbn``) or to the weights (``"weights"``, their default).
    """
    if one_dim not in ONE_DIM:
        raise ValueError(f"one_dim must be one of {ONE_DIM}, got {one_dim!r}")
    out, offset = [], 0
    for _, p in _trainable(model):
        d = direction[offset : offset + p.numel()].reshape(p.shape).clone()
        w = p.detach().to(d.dtype)
        offset += p.numel()
        if p.dim() <= 1:
            d = torch.zeros_like(d) if one_dim == "zero" else w.clone()
        else:
            d_norm = d.reshape(len(d), -1).norm(dim=1)
            w_norm = w.reshape(len(w), -1).norm(dim=1)
            d = d * (w_norm / (d_norm + 1e-10)).reshape(-1, *[1] * (d.dim() - 1))
        out.append(d.reshape(-1))
    if offset != len(direction):
        raise ValueError(f"direction has {len(direction)} entries, the trainable weights {offset}")
    return torch.cat(out)


def random_directions(model: nn.Module, k: int = 1, *, seed: int = 0, one_dim: str = "zero") -> torch.Tensor:
    """``k`` filter-normalized Gaussian directions, ``(k, dim)``, in the weights' dtype and device.

    Drawn from a private CPU generator seeded with ``seed`` (in float64, then cast): the same
    directions on every rank and machine; the global RNG is untouched.
    """
    theta = flat_weights(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(k):
        z = torch.randn(len(theta), generator=g, dtype=torch.float64).to(theta.device, theta.dtype)
        rows.append(filter_normalize(z, model, one_dim))
    return torch.stack(rows)


def eigen_directions(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    normalization: str = "unit",
    mode: str | None = "eval",
    process_group: ProcessGroup = None,
    **lanczos,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` Hessian eigenvectors as directions ``(k, dim)`` and their eigenvalues.

    The Hessian is that of the same loss the landscape evaluates (same batches, same ``mode``);
    keywords go to :func:`measures.hessian.hessian_eigenvalues` (``tol``, ``max_iter``, ``seed``,
    ``progress``...). ``normalization``: "unit" (``||d|| = 1``) or "weights" (``||d|| = ||θ||``).
    """
    if normalization not in EIGEN_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {EIGEN_NORMALIZATIONS}, got {normalization!r}")
    with preserved_module_state(model, mode=mode):
        eig = hessian_eigenvalues(
            model, loss_fn, batches, k, return_eigenvectors=True, process_group=process_group, **lanczos
        )
    theta = flat_weights(model)
    v = eig.eigenvectors.T.to(theta.device, torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    if normalization == "weights":
        v = v * theta.double().norm()
    return v.to(theta.dtype), eig.eigenvalues


def _moved(named, theta: torch.Tensor, directions: torch.Tensor, point: Sequence[float]) -> dict:
    flat = theta.clone()
    for a, d in zip(point, directions, strict=True):
        flat = flat + a * d
    out, offset = {}, 0
    for name, p in named:
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: torch.Tensor,
    coords: Sequence[torch.Tensor | Sequence[float]],
    *,
    mode: str | None = "eval",
    kind: str = "given",
    normalization: str = "given",
    eigenvalues: torch.Tensor | None = None,
    process_group: ProcessGroup = None,
    progress: Callable[[int, int], None] | None = None,
) -> Landscape:
    """Loss and accuracy at ``θ + Σ_j coords_j[i_j] · directions[j]`` for every grid index.

    Args:
        directions: ``(k, dim)`` flat directions, ``k`` = 1 (a curve) or 2 (a surface).
        coords: ``k`` coordinate vectors (the grid is their outer product).
        mode: "eval" (default: BatchNorm's running statistics, untouched), "train" (batch
            statistics; the running ones are restored afterwards) or None (as the model is).
        progress: called as ``progress(done, total)`` after each grid point.

    Each point is one pass over this rank's batches without gradients; the sums of every point
    (loss, correct, count) are all-reduced once at the end.
    """
    directions = torch.as_tensor(directions)
    if directions.dim() == 1:
        directions = directions[None]
    if len(coords) != len(directions) or len(directions) not in (1, 2):
        raise ValueError(
            f"need 1 or 2 directions and as many coordinate vectors, got {len(directions)}/{len(coords)}"
        )
    named = _trainable(model)
    theta = flat_weights(model)
    if directions.shape[1] != len(theta):
        raise ValueError(f"directions have {directions.shape[1]} entries, the trainable weights {len(theta)}")
    directions = directions.to(theta.device, theta.dtype)
    axes = [torch.as_tensor(c, dtype=torch.float64).reshape(-1) for c in coords]
    points = torch.cartesian_prod(*axes).reshape(-1, len(axes)).tolist()
    sums = torch.zeros((len(points), 3), dtype=torch.float64)
    batches = list(batches)
    with preserved_module_state(model, mode=mode), torch.no_grad():
        for i, point in enumerate(points):
            params = _moved(named, theta, directions, point)
            for x, y in batches:
                if len(x) == 0:
                    continue
                x, y = x.to(theta.device), y.to(theta.device)
                out = functional_call(model, params, (x,))
                sums[i, 0] += len(x) * float(loss_fn(out, y))
                sums[i, 1] += float((out.argmax(dim=1) == y).sum())
                sums[i, 2] += len(x)
            if progress is not None:
                progress(i + 1, len(points))
    sums = all_reduce_sum(sums.to(theta.device), process_group).cpu()
    n = sums[0, 2]
    if n == 0:
        raise ValueError("no samples: every batch on every rank is empty")
    shape = tuple(len(a) for a in axes)
    return Landscape(
        coords=axes,
        loss=(sums[:, 0] / n).reshape(shape),
        accuracy=(sums[:, 1] / n).reshape(shape),
        kind=kind,
        normalization=normalization,
        direction_norms=directions.double().norm(dim=1).cpu(),
        weight_norm=float(theta.double().norm()),
        mode="as found" if mode is None else mode,
        n_samples=int(n),
        eigenvalues=None if eigenvalues is None else torch.as_tensor(eigenvalues, dtype=torch.float64),
    )
