"""Power iteration, Hutchinson's trace and the spectral density of a symmetric operator: pure torch.

The solvers beside Lanczos eigenvalues (:mod:`measures.linalg`), on the same
:class:`~measures.operators.LinearOperator` and with the same rule for distributed use: every
decision depends only on the vectors ``matvec`` returns and on a private generator seeded with
``seed``, so all ranks take the same steps.

- :func:`power_eigenvalues`: power iteration with deflation (PyHessian's method, for parity);
- :func:`hutchinson_trace`: Hutchinson's trace estimator with a standard-error stop;
- :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a low-rank
  sketch exactly, Hutchinson on the rest, with the same standard error and stop;
- :func:`lanczos_density`: stochastic Lanczos quadrature of the spectral density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from measures.linalg import EigenResult
from measures.operators import (
    Basis,
    Counted,
    LinearOperator,
    gaussian_unit_vector,
    lanczos_process,
    rademacher,
    seeded_generator,
    tridiagonal,
)

__all__ = [
    "DensityResult",
    "TraceResult",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_density",
    "power_eigenvalues",
]


def power_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """Largest-magnitude eigenpairs by power iteration with deflation (PyHessian's method).

    For each eigenpair in turn: ``v <- P H v / ||P H v||`` with ``P`` the projector off the
    eigenvectors already found, Rayleigh quotient ``θ = vᵀ P H v``, until the residual
    ``||P H v - θ v|| <= tol · |θ|`` or ``max_iter`` products. Convergence is linear in
    ``|λ_{i+1}/λ_i|``, so it needs many more products than Lanczos for the same accuracy, and it
    finds the largest MAGNITUDE (a negative eigenvalue if it dominates). Kept for parity.
    """
    if k < 1:
        raise ValueError(f"need k >= 1, got {k!r}")
    gen = seeded_generator(seed)
    matvec = Counted(op)
    found = Basis(op.dim, op.device, capacity=k)
    values, residuals, all_ok, n_iter = [], [], True, 0
    for _ in range(k):
        v = found.orthogonalize(gaussian_unit_vector(gen, op.dim, op.device))
        v = v / v.norm()
        theta, res = 0.0, math.inf
        for _ in range(max_iter):
            w = found.orthogonalize(matvec(v))
            n_iter += 1
            theta = float(v @ w)
            res = float((w - theta * v).norm())
            if res <= tol * abs(theta):
                break
            v = w / w.norm()
        all_ok &= res <= tol * abs(theta)
        values.append(theta)
        residuals.append(res)
        found.append(v)
    order = sorted(range(k), key=lambda i: -abs(values[i]))
    empty = torch.empty(0, dtype=torch.float64)
    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64)[order],
        residuals=torch.tensor(residuals, dtype=torch.float64)[order],
        smallest=empty,
        smallest_residuals=empty,
        n_hvp=matvec.calls,
        n_iter=n_iter,
        converged=bool(all_ok),
        method="power",
        eigenvectors=found.matrix.T[:, order] if return_eigenvectors else None,
    )


@dataclass
class TraceResult:
    """Hutchinson estimate of ``tr(H)``.

    Attributes:
        trace: mean of ``zᵀ H z`` over the Rademacher samples.
        stderr: standard error of that mean (sample std / sqrt(n)).
        n_samples: number of random vectors used.
        n_hvp: Hessian-vector products used (= n_samples).
        converged: ``stderr <= rtol · |trace|`` was reached before ``max_samples``.
        samples: the individual ``zᵀ H z`` values (float64).
    """

    trace: float
    stderr: float
    n_samples: int
    n_hvp: int
    converged: bool
    samples: torch.Tensor = field(repr=False)


def hutchinson_trace(
    op: LinearOperator,
    *,
    rtol: float = 1e-2,
    min_samples: int = 10,
    max_samples: int = 500,
    block: int = 1,
    seed: int = 0,
) -> TraceResult:
    """Hutchinson's estimator ``tr(H) = E[zᵀ H z]`` with Rademacher ``z`` (entries ±1).

    Draws ``block`` vectors at a time and stops once ``n >= min_samples`` and the standard
    error ``std(zᵀHz)/sqrt(n) <= rtol · |mean|`` (a statistical criterion, not the change of the
    mean), or at ``max_samples``. The variance of one sample is ``2 Σ_{i≠j} H_ij²``. An operator
    with a ``matmat`` (e.g. :class:`~measures.hessian.HessianOperator`) gets each block as one
    batched product.
    """
    if rtol <= 0 or block < 1 or min_samples < 2 or max_samples < min_samples:
        raise ValueError(
            f"need rtol > 0, block >= 1, 2 <= min_samples <= max_samples; got rtol={rtol!r}, "
            f"block={block!r}, min_samples={min_samples!r}, max_samples={max_samples!r}"
        )
    gen = seeded_generator(seed)
    matvec = Counted(op)
    samples = torch.empty(0, dtype=torch.float64)
    converged = False
    while len(samples) < max_samples:
        b = min(block, max_samples - len(samples))
        z = rademacher(gen, (op.dim, b), op.device)
        if b > 1 and hasattr(op, "matmat"):  # one batched product for the block
            hz = op.matmat(z)
            matvec.calls += b
        else:
            hz = torch.stack([matvec(z[:, j]) for j in range(b)], dim=1)
        samples = torch.cat([samples, (z * hz).sum(0).cpu()])
        n = len(samples)
        if n >= min_samples:
            stderr = float(samples.std() / math.sqrt(n))
            if stderr <= rtol * abs(float(samples.mean())):
                converged = True
                break
    n = len(samples)
    return TraceResult(
        trace=float(samples.mean()),
        stderr=float(samples.std() / math.sqrt(n)) if n > 1 else math.inf,
        n_samples=n,
        n_hvp=matvec.calls,
        converged=converged,
        samples=samples,
    )


def _products(op: LinearOperator, matvec: Counted, vs: torch.Tensor) -> torch.Tensor:
    """``A V`` column by column, or as one batched product where the operator has ``matmat``."""
    if vs.shape[1] > 1 and hasattr(op, "matmat"):
        matvec.calls += vs.shape[1]
        return op.matmat(vs)
    return torch.stack([matvec(vs[:, j]) for j in range(vs.shape[1])], dim=1)


def hutchpp_trace(
    op: LinearOperator,
    *,
    sketch: int = 10,
    rtol: float = 1e-2,
    min_samples: int = 10,
    max_samples: int = 500,
    block: int = 1,
    seed: int = 0,
) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with Hutchinson's standard-error stop.

    ``Q``: an orthonormal basis of ``A S`` for a ``(dim, sketch)`` Rademacher ``S`` (``sketch``
    products); the trace is ``tr(Qᵀ A Q)`` (``sketch`` more, exact) plus Hutchinson's estimate of
    the trace of the deflated ``(I - QQᵀ) A (I - QQᵀ)``: samples ``gᵀ A g`` with ``g = (I - QQᵀ) z``,
    one product each, drawn until ``n >= min_samples`` and their standard error ``<= rtol ·
    |trace|`` or ``max_samples`` (as :func:`hutchinson_trace`). ``stderr`` is that of the
    Hutchinson part (the sketch's part has none); ``n_hvp = 2·sketch + n_samples``;
    ``samples`` holds the deflated samples. With a decaying spectrum the top of it is in ``Q`` and
    the variance left is that of the tail: fewer products for the same error. Fixed budget ``m``
    as in the paper: ``sketch = m/3``, ``min_samples = max_samples = m/3``.
    """
    if sketch < 1 or rtol <= 0 or block < 1 or min_samples < 2 or max_samples < min_samples:
        raise ValueError(
            f"need sketch >= 1, rtol > 0, block >= 1, 2 <= min_samples <= max_samples; got sketch="
            f"{sketch!r}, rtol={rtol!r}, block={block!r}, min_samples={min_samples!r}, max_samples={max_samples!r}"
        )
    gen = seeded_generator(seed)
    matvec = Counted(op)
    s = rademacher(gen, (op.dim, min(sketch, op.dim)), op.device)
    q, _ = torch.linalg.qr(_products(op, matvec, s))
    low_rank = float(torch.trace(q.T @ _products(op, matvec, q)))
    samples = torch.empty(0, dtype=torch.float64)
    converged = False
    while len(samples) < max_samples:
        b = min(block, max_samples - len(samples))
        g = rademacher(gen, (op.dim, b), op.device)
        g = g - q @ (q.T @ g)
        samples = torch.cat([samples, (g * _products(op, matvec, g)).sum(0).cpu()])
        n = len(samples)
        if n >= min_samples:
            stderr = float(samples.std() / math.sqrt(n))
            if stderr <= rtol * abs(low_rank + float(samples.mean())):
                converged = True
                break
    n = len(samples)
    return TraceResult(
        trace=low_rank + float(samples.mean()),
        stderr=float(samples.std() / math.sqrt(n)) if n > 1 else math.inf,
        n_samples=n,
        n_hvp=matvec.calls,
        converged=converged,
        samples=samples,
    )


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature of the spectral density ``ρ(t) = (1/d) Σ_i δ(t - λ_i)``.

    Attributes:
        nodes: ``(n_vectors, m)`` Ritz values of each run (Gauss quadrature nodes).
        weights: ``(n_vectors, m)`` squared first components of the Ritz vectors; each row sums
            to 1 and estimates ``zᵀ δ(t - H) z / ||z||²``.
        n_hvp: Hessian-vector products used.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_hvp: int

    def density(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid`` (integrates to ~1 over a wide grid).

        ``sigma`` defaults to 1% of the spread of the nodes.
        """
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if sigma is None:
            sigma = 0.01 * float(self.nodes.max() - self.nodes.min()) or 1e-12
        diff = grid[:, None, None] - self.nodes[None]
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights[None]).sum(-1).mean(-1)


def lanczos_density(
    op: LinearOperator, *, n_steps: int = 80, n_vectors: int = 1, seed: int = 0
) -> DensityResult:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; PyHessian's ``density``).

    For each of ``n_vectors`` Rademacher start vectors ``z``, run ``n_steps`` Lanczos steps
    from ``z/||z||``; the eigenvalues ``θ_i`` and squared first eigenvector components ``τ_i`` of
    ``T`` are a Gauss quadrature rule: ``zᵀ f(H) z / ||z||² ≈ Σ_i τ_i f(θ_i)``. Uses
    ``torch.linalg.eigh`` (PyHessian's ``torch.eig`` no longer exists).
    """
    if n_steps < 1 or n_vectors < 1:
        raise ValueError(f"need n_steps >= 1 and n_vectors >= 1, got {n_steps!r}, {n_vectors!r}")
    gen = seeded_generator(seed)
    matvec = Counted(op)
    m = min(n_steps, op.dim)
    nodes = torch.zeros((n_vectors, m), dtype=torch.float64)
    weights = torch.zeros((n_vectors, m), dtype=torch.float64)
    for r in range(n_vectors):
        z = rademacher(gen, (op.dim,), op.device)
        alphas, betas, _ = lanczos_process(
            matvec, z / z.norm(), m, lambda: gaussian_unit_vector(gen, op.dim, op.device)
        )
        theta, s = torch.linalg.eigh(tridiagonal(alphas, betas[:-1]))
        nodes[r, : len(theta)] = theta
        weights[r, : len(theta)] = s[0] ** 2
    return DensityResult(nodes=nodes, weights=weights, n_hvp=matvec.calls)
