"""Eigenvalues, trace and spectral density of a symmetric linear operator: pure torch.

The solvers here see an operator only through :class:`LinearOperator`: a size ``dim``, a
``device`` and a symmetric ``matvec``. The same Lanczos therefore runs on a network's Hessian
(:class:`measures.hessian.HessianOperator`) and on a plain matrix (:class:`MatrixOperator`), which
is how it is tested against ``torch.linalg.eigvalsh``.

Distributed use needs nothing here: every decision (stop, restart) depends only on the vectors
``matvec`` returns (identical on every rank when the operator all-reduces its products) and on a
private generator seeded with ``seed`` (identical on every rank), so all ranks take the same
steps and run the operator's collectives in the same order.

- :func:`lanczos_eigenvalues`: top-k (and lowest) eigenpairs, Lanczos with full
  reorthogonalization and a residual stop;
- :func:`power_eigenvalues`: power iteration with deflation (PyHessian's method, for parity);
- :func:`hutchinson_trace`: Hutchinson's trace estimator with a standard-error stop;
- :func:`lanczos_density`: stochastic Lanczos quadrature of the spectral density.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = [
    "DEFAULT_TOL",
    "DensityResult",
    "EigenResult",
    "LinearOperator",
    "MatrixOperator",
    "TraceResult",
    "hutchinson_trace",
    "lanczos_density",
    "lanczos_eigenvalues",
    "power_eigenvalues",
]

DEFAULT_TOL = 1e-5
"""Default Lanczos stop: every wanted Ritz pair has ``||Hv - θv|| <= tol · max|θ|``.

The eigenvalue error of a Ritz value is at most its residual and, once the residual is below
the gap to the next eigenvalue, about ``residual² / gap``; at 1e-5 the top eigenvalues of the
test networks are exact to ~1e-10 relative (float64), and float32 products still reach it."""


class LinearOperator(Protocol):
    """What the solvers need of an operator: a symmetric ``matvec`` on flat vectors of length ``dim``.

    ``matvec`` takes and returns float64 vectors on ``device``; it must be symmetric
    (``uᵀ(Av) = (Au)ᵀv``). Under ``torch.distributed`` it must return the same vector on every rank.
    """

    dim: int
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """A symmetric matrix as a :class:`LinearOperator` (tests, and small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix.to(torch.float64)
        self.dim = matrix.shape[0]
        self.device = matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v


class _Counted:
    """``op.matvec`` that counts its calls (the products a solver used)."""

    def __init__(self, op: LinearOperator) -> None:
        self.op, self.calls = op, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.op.matvec(v)


@dataclass
class EigenResult:
    """Extreme eigenvalues of a symmetric operator (e.g. a Hessian).

    Attributes:
        eigenvalues: the ``k`` wanted eigenvalues (float64, CPU), descending: the largest
            algebraic ones (``which="top"``) or the largest in magnitude, ordered by
            descending magnitude (``which="magnitude"``).
        residuals: per eigenpair, the ABSOLUTE residual ``||H v - θ v||`` (unit ``v``). For
            Lanczos it is the estimate ``|β_m s_m|``, which equals the true residual in exact
            arithmetic; an eigenvalue is within this distance of an exact one.
        smallest: the ``smallest`` lowest eigenvalues, ascending (empty if not asked).
        smallest_residuals: their absolute residuals.
        eigenvectors: ``(dim, k)`` unit eigenvectors (float64) if requested, else None.
        smallest_eigenvectors: ``(dim, smallest)`` likewise.
        n_hvp: operator products (Hessian-vector products: each over the whole data, all ranks).
        n_iter: Lanczos steps (or total power iterations).
        converged: every wanted residual reached ``tol · max|θ|`` (power: ``tol · |θ|``).
        method: "lanczos" or "power".
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    smallest: torch.Tensor
    smallest_residuals: torch.Tensor
    n_hvp: int
    n_iter: int
    converged: bool
    method: str
    eigenvectors: torch.Tensor | None = None
    smallest_eigenvectors: torch.Tensor | None = None


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _gaussian(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    """A unit random vector, float64; identical on every rank (the same seeded CPU draw)."""
    v = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    return v / v.norm()


def _rademacher(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random ±1 entries (float64); identical on every rank (the same seeded CPU draw)."""
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(device=device, dtype=torch.float64)
    return 2 * z - 1


class _Basis:
    """Growing orthonormal basis stored as rows of a float64 matrix (capacity doubles)."""

    def __init__(self, dim: int, device: torch.device, capacity: int = 16) -> None:
        self.rows = torch.empty((capacity, dim), dtype=torch.float64, device=device)
        self.m = 0

    def append(self, q: torch.Tensor) -> None:
        if self.m == len(self.rows):
            grown = torch.empty(
                (max(2 * self.m, 1), self.rows.shape[1]), dtype=self.rows.dtype, device=self.rows.device
            )
            grown[: self.m] = self.rows
            self.rows = grown
        self.rows[self.m] = q
        self.m += 1

    @property
    def matrix(self) -> torch.Tensor:
        return self.rows[: self.m]

    def orthogonalize(self, w: torch.Tensor) -> torch.Tensor:
        """Remove the basis components of ``w`` by classical Gram-Schmidt.

        A second pass runs only when the first removed most of ``w`` (DGKS criterion: the norm
        fell below 1/√2 of its value), the case where one pass can leave rounding-level
        components behind ('twice is enough')."""
        q = self.matrix
        before = w.norm()
        w = w - q.T @ (q @ w)
        if w.norm() < 0.7071 * before:
            w = w - q.T @ (q @ w)
        return w


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    max_steps: int,
    new_start: Callable[[], torch.Tensor],
    done: Callable[[torch.Tensor, torch.Tensor, float], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _Basis]:
    """Lanczos with full reorthogonalization: ``Q^T H Q = T`` tridiagonal.

    Builds an orthonormal basis ``q_1..q_m`` of the Krylov space ``{q0, H q0, H² q0, ...}``
    and ``T = tridiag(β, α, β)`` with ``α_j = q_jᵀ H q_j`` and ``β_j = ||r_j||`` where ``r_j`` is
    ``H q_j`` made orthogonal to all previous ``q``. An eigenpair ``(θ, s)`` of ``T`` gives the
    Ritz pair ``(θ, Q s)`` with residual ``||H Q s - θ Q s|| = |β_m s_m|``. If ``β`` vanishes
    (an invariant subspace: the start vector misses some eigenvectors, e.g. repeated
    eigenvalues) Lanczos restarts from a fresh random vector orthogonal to the basis, with
    ``β = 0`` (``T`` becomes block diagonal). ``done(alphas, betas, β_m)`` is asked after each
    step. Returns ``(alphas, betas[:m], basis)``; ``betas[m-1]`` is the last residual norm.
    """
    dim = q0.numel()
    basis = _Basis(dim, q0.device, capacity=min(max_steps, 16))
    alphas: list[float] = []
    betas: list[float] = []
    q = q0
    scale = 0.0
    for _ in range(max_steps):
        basis.append(q)
        w = matvec(q)
        alphas.append(float(q @ w))
        w = w - alphas[-1] * q - (betas[-1] * basis.rows[basis.m - 2] if basis.m > 1 and betas[-1] else 0)
        w = basis.orthogonalize(w)  # full reorthogonalization against every q
        beta = float(w.norm())
        scale = max(scale, abs(alphas[-1]) + beta)
        betas.append(beta)
        a, b = torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)
        if basis.m >= dim or (done is not None and done(a, b[:-1], beta)):
            break
        if beta <= 1e-12 * scale:  # invariant subspace: restart orthogonally, T block diagonal
            betas[-1] = 0.0
            w = basis.orthogonalize(new_start())
            beta = float(w.norm())
        q = w / beta
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64), basis


def _tridiagonal(alphas: torch.Tensor, offdiag: torch.Tensor) -> torch.Tensor:
    return torch.diag(alphas) + torch.diag(offdiag, 1) + torch.diag(offdiag, -1)


def _wanted(theta: torch.Tensor, k: int, which: str, smallest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into ascending ``theta``) of the k wanted and of the ``smallest`` lowest Ritz values."""
    m = len(theta)
    if which == "top":
        top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    else:
        top = torch.argsort(theta.abs(), descending=True, stable=True)[:k]
    return top, torch.arange(min(smallest, m))


def lanczos_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "top",
    smallest: int = 0,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """Extreme eigenpairs of ``op`` by Lanczos with full reorthogonalization.

    Runs until every wanted Ritz pair (the ``k`` top and the ``smallest`` lowest) has
    residual ``|β_m s_m| <= tol · max|θ|``, or ``max_iter`` steps (one product each; the basis
    costs ``max_iter · dim`` float64 entries). The start vector is Gaussian from a private
    generator seeded with ``seed``. Repeated eigenvalues are found once per Krylov space; the
    restart on breakdown recovers copies only when the space is exhausted.
    """
    if which not in ("top", "magnitude"):
        raise ValueError(f"which must be 'top' or 'magnitude', got {which!r}")
    if k < 1 or smallest < 0:
        raise ValueError(f"need k >= 1 and smallest >= 0, got k={k!r}, smallest={smallest!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if k > op.dim or smallest > op.dim:
        raise ValueError(f"k={k} / smallest={smallest} exceed the Hessian dimension {op.dim}")
    gen = _generator(seed)
    n_wanted = max(k, smallest)
    matvec = _Counted(op)

    def converged(alphas: torch.Tensor, offdiag: torch.Tensor, beta: float) -> bool:
        if len(alphas) < n_wanted and len(alphas) < op.dim:
            return False
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, offdiag))
        res = (beta * s[-1]).abs()
        top, low = _wanted(theta, k, which, smallest)
        return bool((res[torch.cat([top, low])] <= tol * theta.abs().max()).all())

    device = op.device
    alphas, betas, basis = _lanczos(
        matvec, _gaussian(gen, op.dim, device), max_iter, lambda: _gaussian(gen, op.dim, device), converged
    )
    theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas[:-1]))
    res = (betas[-1] * s[-1]).abs()
    top, low = _wanted(theta, k, which, smallest)
    ok = bool((res[torch.cat([top, low])] <= tol * theta.abs().max()).all()) or basis.m >= op.dim
    vecs = low_vecs = None
    if return_eigenvectors:
        q = basis.matrix
        vecs = q.T @ s[:, top].to(device)
        low_vecs = q.T @ s[:, low].to(device)
    return EigenResult(
        eigenvalues=theta[top],
        residuals=res[top],
        smallest=theta[low],
        smallest_residuals=res[low],
        n_hvp=matvec.calls,
        n_iter=len(alphas),
        converged=ok,
        method="lanczos",
        eigenvectors=vecs,
        smallest_eigenvectors=low_vecs,
    )


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
    gen = _generator(seed)
    matvec = _Counted(op)
    found = _Basis(op.dim, op.device, capacity=k)
    values, residuals, all_ok, n_iter = [], [], True, 0
    for _ in range(k):
        v = found.orthogonalize(_gaussian(gen, op.dim, op.device))
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
    mean), or at ``max_samples``. The variance of one sample is ``2 Σ_{i≠j} H_ij²``.
    """
    if rtol <= 0 or block < 1 or min_samples < 2 or max_samples < min_samples:
        raise ValueError(
            f"need rtol > 0, block >= 1, 2 <= min_samples <= max_samples; got rtol={rtol!r}, "
            f"block={block!r}, min_samples={min_samples!r}, max_samples={max_samples!r}"
        )
    gen = _generator(seed)
    matvec = _Counted(op)
    samples = torch.empty(0, dtype=torch.float64)
    converged = False
    while len(samples) < max_samples:
        b = min(block, max_samples - len(samples))
        z = _rademacher(gen, (op.dim, b), op.device)
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
    gen = _generator(seed)
    matvec = _Counted(op)
    m = min(n_steps, op.dim)
    nodes = torch.zeros((n_vectors, m), dtype=torch.float64)
    weights = torch.zeros((n_vectors, m), dtype=torch.float64)
    for r in range(n_vectors):
        z = _rademacher(gen, (op.dim,), op.device)
        alphas, betas, _ = _lanczos(matvec, z / z.norm(), m, lambda: _gaussian(gen, op.dim, op.device))
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas[:-1]))
        nodes[r, : len(theta)] = theta
        weights[r, : len(theta)] = s[0] ** 2
    return DensityResult(nodes=nodes, weights=weights, n_hvp=matvec.calls)
