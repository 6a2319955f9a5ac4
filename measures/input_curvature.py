"""Curvature of the loss in input space, per example: ∇²ₓ L(x, y) at clean or adversarial points.

The attack's inner loop maximizes the loss over the input, so its landscape is the input Hessian of
each example's loss. For a network that is piecewise linear in its input (ReLU, max-pool, eval-mode
BatchNorm) that Hessian is Jᵀ(diag(p) − ppᵀ)J almost everywhere (J: the logits' Jacobian in the input,
p: the softmax), positive semidefinite: no saddle points. Smooth activations add the network's own
second derivative, which can be indefinite. What is computed here is the true Hessian (double
backprop), not its Gauss–Newton part, so the two cases can be told apart.

One product serves the whole batch: in eval mode the examples are independent, so the input Hessian
of the batch's summed loss is block-diagonal, and one double-backward pass with a batch of
directions ``V`` (one per example) returns every example's own ``H_i v_i``
(:func:`input_hessian_products`). :func:`batched_lanczos` runs one Lanczos recurrence per example
side by side on those products, with full reorthogonalization and the framework's stopping rule
(:func:`measures.linalg.ritz_error_bounds`, confirmed over consecutive steps as
:func:`measures.linalg.lanczos_eigenvalues` does). Each example stops at its own step (later
products do not change its result), and its start vector is a function of its index only
(:mod:`measures.noise`), so an example gets the same eigenvalues in any batch, alone, or on any rank.

The trace is exact: the sum of ``e_jᵀ H e_j`` over the input's ``d`` coordinates (``d`` products
for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from measures.linalg import DEFAULT_TOL, ritz_error_bounds
from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.noise import sample_normal

__all__ = [
    "InputCurvature",
    "batched_lanczos",
    "input_curvature",
    "input_hessian_products",
    "input_trace",
]

NOISE_STREAM = 40
"""The :mod:`measures.noise` stream of the Lanczos start vectors (the attacks use lower streams)."""


def input_hessian_products(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``matvec(V) -> H V`` for a batch: row ``i`` of the result is ``∇²ₓ L(x_i, y_i) · V_i``.

    ``L`` is the cross-entropy of example ``i`` (summed over the batch, so each block is that
    example's own Hessian). The model must be in a mode where examples do not interact (eval-mode
    BatchNorm); the caller sets it. The gradient graph is built once and reused by every product.
    """
    x = autograd_input(x).requires_grad_(True)
    with gradients_enabled():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with gradients_enabled():
            (hv,) = torch.autograd.grad(grad, x, grad_outputs=v.view_as(x).to(grad.dtype), retain_graph=True)
        return hv.reshape(len(x), -1)

    return matvec


@dataclass
class BatchedEigen:
    """Per-example results of :func:`batched_lanczos` (row ``i``: example ``i``)."""

    eigenvalues: torch.Tensor  # (B, k), descending
    smallest: torch.Tensor  # (B, smallest), ascending
    errors: torch.Tensor  # (B, k + smallest): estimated |θ − λ| of each reported value
    converged: torch.Tensor  # (B,) bool
    steps: torch.Tensor  # (B,) Lanczos steps each example used
    n_products: int  # batched products computed (one per step of the slowest example)


def _start(index: torch.Tensor, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    q = sample_normal(index, seed, NOISE_STREAM, dim, torch.float64, device)
    return q / q.norm(dim=1, keepdim=True)


def _assess(alphas, betas, beta_last, k, smallest, floor, dim):
    """Ritz values and estimated errors of a batch of tridiagonal matrices (one row per example):
    ``(top, low, err, scale)`` with ``top`` descending, ``low`` ascending."""
    m = alphas.shape[1]
    t = torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    theta, s = torch.linalg.eigh(t)  # ascending
    res = (beta_last[:, None] * s[:, -1, :]).abs()
    top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    low = torch.arange(min(smallest, m))
    scale = theta.abs().amax(1).clamp_min(1e-300)
    err = ritz_error_bounds(theta, res, torch.cat([top, low])).clamp_min(0)
    err = torch.maximum(err, floor * scale[:, None])
    if m >= dim:  # the whole space: exact up to rounding
        err = (floor * scale)[:, None].expand_as(err).clone()
    return theta[:, top], theta[:, low], err, scale


def batched_lanczos(
    matvec,
    index: torch.Tensor,
    dim: int,
    *,
    k: int = 1,
    smallest: int = 1,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
    confirm: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> BatchedEigen:
    """Top-``k`` and ``smallest`` lowest eigenvalues of ``B`` symmetric ``dim × dim`` operators at once.

    ``matvec(V)`` maps a ``(B, dim)`` batch of vectors to the ``(B, dim)`` batch of products (row
    ``i`` through operator ``i``). ``index`` (``B`` integers) names each operator: its start vector
    is drawn from ``(seed, index)`` only. Each recurrence is the Lanczos of
    :func:`measures.linalg.lanczos_eigenvalues` (full reorthogonalization, restart on breakdown
    with an orthogonal random vector) and stops when every wanted value's estimated error is within
    ``tol · max|θ|`` at ``confirm + 1`` consecutive steps, or after ``max_iter`` steps (then it is
    flagged unconverged); ``dtype`` is the products' precision (the error estimate never claims
    less than 8 of its units of roundoff).
    """
    if k < 1 or smallest < 0 or max_iter < 1 or not tol > 0:
        raise ValueError(
            f"need k >= 1, smallest >= 0, max_iter >= 1, tol > 0; got {k}, {smallest}, {max_iter}, {tol}"
        )
    if k + smallest > dim:
        raise ValueError(f"k + smallest = {k + smallest} exceeds the input dimension {dim}")
    device = torch.device(device)
    index = torch.as_tensor(index, dtype=torch.int64)
    b = len(index)
    floor = 8 * torch.finfo(dtype).eps
    steps_max = min(max_iter, dim)
    basis = torch.empty((b, min(steps_max, 16), dim), dtype=torch.float64, device=device)  # grows
    alphas = torch.zeros((b, steps_max), dtype=torch.float64)
    betas = torch.zeros((b, steps_max), dtype=torch.float64)
    q = _start(index, dim, seed, device)
    restarts = 0
    active = torch.ones(b, dtype=torch.bool)
    streak = torch.zeros(b, dtype=torch.int64)
    steps = torch.zeros(b, dtype=torch.int64)
    result_top = torch.full((b, k), math.nan, dtype=torch.float64)
    result_low = torch.full((b, smallest), math.nan, dtype=torch.float64)
    result_err = torch.full((b, k + smallest), math.inf, dtype=torch.float64)
    converged = torch.zeros(b, dtype=torch.bool)
    scale_run = torch.zeros(b, dtype=torch.float64)
    n_products = 0
    for j in range(steps_max):
        if j == basis.shape[1]:  # double the capacity: most recurrences stop long before steps_max
            basis = torch.cat([basis, torch.empty_like(basis[:, : min(j, steps_max - j)])], 1)
        basis[:, j] = q
        w = matvec(q.to(dtype)).to(torch.float64)
        n_products += 1
        a = (q * w).sum(1)
        alphas[:, j] = a.cpu()
        w = w - a[:, None] * q
        if j > 0:
            w = w - betas[:, j - 1].to(device)[:, None] * basis[:, j - 1]
        qs = basis[:, : j + 1]
        for _ in range(2):  # full reorthogonalization, twice ('twice is enough')
            w = w - torch.einsum("bjd,bj->bd", qs, torch.einsum("bjd,bd->bj", qs, w))
        beta = w.norm(dim=1)
        betas[:, j] = beta.cpu()
        scale_run = torch.maximum(scale_run, (a.abs() + beta).cpu())
        rows = torch.nonzero(active).flatten()
        top, low, err, scale = _assess(
            alphas[rows, : j + 1], betas[rows, :j], betas[rows, j], k, smallest, floor, dim
        )
        enough = j + 1 > k + smallest
        held = (err.amax(1) <= tol * scale) & enough
        streak[rows] = torch.where(held, streak[rows] + 1, 0)
        whole = j + 1 >= dim
        stop = (streak[rows] > confirm) | whole | (j + 1 == steps_max)
        done = rows[stop]
        active[done] = False
        steps[done] = j + 1
        converged[done] = held[stop] | whole
        result_top[done, : top.shape[1]] = top[stop]
        result_low[done, : low.shape[1]] = low[stop]
        result_err[done, : err.shape[1]] = err[stop]
        if not bool(active.any()):
            break
        # breakdown (an invariant subspace, e.g. a rank-deficient Hessian): restart orthogonally
        broke = (beta.cpu() <= 1e-12 * scale_run) & active
        if bool(broke.any()):
            restarts += 1
            fresh = _start(index + restarts * (1 << 40), dim, seed, device)
            for _ in range(2):
                fresh = fresh - torch.einsum("bjd,bj->bd", qs, torch.einsum("bjd,bd->bj", qs, fresh))
            betas[broke, j] = 0.0
            w = torch.where(broke.to(device)[:, None], fresh, w)
            beta = torch.where(broke.to(device), w.norm(dim=1), beta)
        q = w / beta.clamp_min(1e-300)[:, None]
    return BatchedEigen(result_top, result_low, result_err, converged, steps, n_products)


def input_trace(
    matvec, batch: int, dim: int, device, dtype=torch.float64, chunk: int | None = None
) -> torch.Tensor:
    """Exact trace of each example's input Hessian: ``Σ_j e_jᵀ H_i e_j`` over the ``dim`` coordinates
    (``dim`` batched products)."""
    trace = torch.zeros(batch, dtype=torch.float64, device=device)
    for j in range(dim):
        e = torch.zeros((batch, dim), dtype=dtype, device=device)
        e[:, j] = 1
        trace += matvec(e)[:, j].to(torch.float64)
    return trace


@dataclass
class InputCurvature:
    """Per-example input-space curvature of a batch (row ``i``: example ``i``)."""

    top: torch.Tensor  # (B, k) largest eigenvalues, descending
    smallest: torch.Tensor  # (B,) λ_min
    trace: torch.Tensor | None  # (B,) exact trace, or None when not asked for
    errors: torch.Tensor  # (B, k + 1) estimated eigenvalue errors
    converged: torch.Tensor  # (B,) bool
    n_products: int

    def negative(self, tol: float) -> torch.Tensor:
        """(B,) bool: λ_min < −tol · λ_max (a direction of clearly negative curvature)."""
        return self.smallest < -tol * self.top[:, 0].abs()


def input_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    k: int = 1,
    trace: bool = True,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
    seed: int = 0,
) -> InputCurvature:
    """Top-``k`` eigenvalues, λ_min and (exact) trace of ``∇²ₓ L(x_i, y_i)`` for every example.

    The model is measured in eval mode and left exactly as found (modes, buffers, ``.grad``, RNG).
    ``index``: the examples' global indices (default ``0..B-1``), which seed their start vectors,
    so a sharded batch gives each example the numbers it gets unsharded. Products run in the
    model's parameter dtype (float64 model: float64 products).
    """
    index = torch.arange(len(x)) if index is None else torch.as_tensor(index)
    dim = x[0].numel()
    dtype = next(model.parameters()).dtype
    with preserved_module_state(model, mode="eval"):
        matvec = input_hessian_products(model, x.to(dtype), y)
        eig = batched_lanczos(
            matvec,
            index,
            dim,
            k=k,
            smallest=1,
            tol=tol,
            max_iter=max_iter,
            seed=seed,
            device=x.device,
            dtype=dtype,
        )
        tr = input_trace(matvec, len(x), dim, x.device, dtype) if trace else None
    return InputCurvature(
        top=eig.eigenvalues,
        smallest=eig.smallest[:, 0],
        trace=None if tr is None else tr.cpu(),
        errors=eig.errors,
        converged=eig.converged,
        n_products=eig.n_products + (dim if trace else 0),
    )
