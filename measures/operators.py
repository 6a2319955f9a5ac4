"""Symmetric linear operators and the Krylov machinery the solvers share: pure torch.

The solvers (:mod:`measures.linalg`: Lanczos eigenvalues; :mod:`measures.estimators`: power
iteration, Hutchinson trace, spectral density) see an operator only through
:class:`LinearOperator`: a size ``dim``, a ``device`` and a symmetric ``matvec``. The same Lanczos
therefore runs on a network's Hessian (:class:`measures.hessian.HessianOperator`) and on a plain
matrix (:class:`MatrixOperator`), which is how it is tested against ``torch.linalg.eigvalsh``.

Here too: the seeded random vectors (the same on every rank), the growing orthonormal basis, and
the Lanczos process (:func:`lanczos_process`) that both the eigenvalue solver and the spectral
density run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

__all__ = [
    "Basis",
    "Counted",
    "LinearOperator",
    "MatrixOperator",
    "gaussian_unit_vector",
    "lanczos_process",
    "rademacher",
    "seeded_generator",
    "tridiagonal",
]


class LinearOperator(Protocol):
    """What the solvers need of an operator: a symmetric ``matvec`` on flat vectors of length ``dim``.

    ``matvec`` takes and returns float64 vectors on ``device``; it must be symmetric
    (``uᵀ(Av) = (Au)ᵀv``). Under ``torch.distributed`` it must return the same vector on every rank.
    An optional ``dtype`` attribute names the precision the products are computed in (float64 if
    absent); the eigenvalue error estimate never claims less than that precision's rounding.
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
        self.dtype = torch.float64

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v


class Counted:
    """``op.matvec`` that counts its calls (the products a solver used)."""

    def __init__(self, op: LinearOperator) -> None:
        self.op, self.calls = op, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.op.matvec(v)


def seeded_generator(seed: int) -> torch.Generator:
    """A solver's private CPU generator: the same draws on every rank, the global RNG untouched."""
    return torch.Generator().manual_seed(int(seed))


def gaussian_unit_vector(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    """A unit random vector, float64; identical on every rank (the same seeded CPU draw)."""
    v = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    return v / v.norm()


def rademacher(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random ±1 entries (float64); identical on every rank (the same seeded CPU draw)."""
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(device=device, dtype=torch.float64)
    return 2 * z - 1


class Basis:
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


def lanczos_process(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    max_steps: int,
    new_start: Callable[[], torch.Tensor],
    done: Callable[[torch.Tensor, torch.Tensor, float], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Basis]:
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
    basis = Basis(dim, q0.device, capacity=min(max_steps, 16))
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


def tridiagonal(alphas: torch.Tensor, offdiag: torch.Tensor) -> torch.Tensor:
    """Lanczos' ``T``: ``alphas`` on the diagonal, ``offdiag`` on both off-diagonals."""
    return torch.diag(alphas) + torch.diag(offdiag, 1) + torch.diag(offdiag, -1)
