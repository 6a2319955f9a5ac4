"""Hessian spectrum of a model's loss: exact Hessian-vector products, Lanczos, Hutchinson, SLQ.

The loss is the sample-weighted mean over every sample of every batch (on every rank)::

    L(θ) = (1/N) Σ_b n_b · loss_fn(model(x_b), y_b),   N = Σ_b n_b  (summed over ranks)

where ``loss_fn`` returns a batch mean (e.g. ``nn.CrossEntropyLoss()``). The Hessian is taken
with respect to every parameter with ``requires_grad=True``, flattened in ``model.parameters()``
order. This module is pure torch (no Lightning) and is organised in three layers:

1. :class:`HessianOperator` -- the linear map ``v -> H v``. Each product is exact
   (Pearlmutter's double backprop: ``g = ∂L/∂θ`` with ``create_graph=True``, then
   ``H v = ∂(g·v)/∂θ``), never a finite difference, and never calls ``.backward()``.
   With ``cache=True`` the forward pass and first backward are done once and kept, so each
   product is one second backward; ``cache=False`` recomputes them per product (data larger
   than memory). Under ``torch.distributed`` each rank sums its shard and the product is
   all-reduced, so every rank holds the same vector bit for bit.
2. Algorithms on an operator: :func:`lanczos_eigenvalues`, :func:`power_eigenvalues`,
   :func:`hutchinson_trace`, :func:`lanczos_density`. Every decision they take (stop, restart)
   depends only on all-reduced vectors and on a private seeded generator, so all ranks run the
   same number of collectives and return identical results.
3. One-call functions on a model: :func:`hessian_eigenvalues`, :func:`hessian_trace`,
   :func:`hessian_density`. They leave the model exactly as found (train/eval flags, ``.grad``,
   buffers, ``requires_grad``, global RNG) and work inside ``torch.no_grad()`` and
   ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from callbacks.common import (
    all_reduce_sum,
    broadcast_,
    gradients_enabled,
    parameters_requiring_grad,
    preserved_module_state,
)

__all__ = [
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "TraceResult",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "lanczos_density",
    "lanczos_eigenvalues",
    "power_eigenvalues",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_TOL = 1e-5
"""Default Lanczos stop: every wanted Ritz pair has ``||Hv - θv|| <= tol · max|θ|``.

The eigenvalue error of a Ritz value is at most its residual and, once the residual is below
the gap to the next eigenvalue, about ``residual² / gap``; at 1e-5 the top eigenvalues of the
test networks are exact to ~1e-10 relative (float64), and float32 products still reach it."""


# --------------------------------------------------------------------------------------------
# Layer 1: the Hessian as a linear operator
# --------------------------------------------------------------------------------------------


def _available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


class _SavedBytes:
    """Counts the bytes autograd saves for backward (each storage once) while active."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@contextlib.contextmanager
def _private_buffers(model: nn.Module) -> Iterator[None]:
    """Let forward passes use (and BatchNorm update) clones of the buffers, then put back the originals.

    A kept graph saves the buffers it read (e.g. BatchNorm's running statistics); restoring
    their values in place afterwards (``preserved_module_state``) would bump their version
    counters and invalidate the graph. Clones that nobody touches later keep it valid.
    """
    saved = [
        (mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items() if buf is not None
    ]
    for mod, name, buf in saved:
        mod._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for mod, name, buf in saved:
            mod._buffers[name] = buf


class HessianOperator:
    """The Hessian ``H = ∇²L(θ)`` of the sample-weighted mean loss, as a linear operator.

    Args:
        model: the network, used in the mode it is in (``.eval()``/``.train()`` never called).
        loss_fn: ``loss_fn(model(x), y)`` returns the mean loss of a batch.
        batches: a re-iterable of ``(inputs, targets)``; this rank's shard under DDP (may be
            empty). Batches may differ in size; empty batches are skipped.
        cache: ``True`` keeps each batch's forward graph and gradient graph, so a product is
            one second backward pass (memory: about 2-3x a training step per sample, for all
            samples at once). ``False`` redoes forward + first backward per product, one batch
            at a time. ``"auto"`` measures the bytes saved for backward by the first batch,
            extrapolates to this rank's samples and caches when that fits in
            ``cache_memory_fraction`` of the free memory of the parameters' device.

    The operator is valid for the parameter values at construction: an in-place parameter
    update afterwards makes autograd raise on the next cached product. ``release()`` frees
    the cached graphs. Construction and every product run under ``gradients_enabled()``;
    forward passes run under ``preserved_module_state(model)``, so BatchNorm statistics and
    the global RNG are restored (and a train-mode dropout draws the same masks for every
    product, cached or not).

    Attributes:
        dim: number of Hessian rows (trainable parameter entries).
        n_samples: total number of samples (all ranks).
        n_hvp: Hessian-vector products done so far (a ``matmat`` of b columns counts b).
        cached: whether the graphs are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        *,
        cache: bool | str = "auto",
        cache_memory_fraction: float = 0.5,
    ) -> None:
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        if not 0 < cache_memory_fraction <= 1:
            raise ValueError(f"cache_memory_fraction must be in (0, 1], got {cache_memory_fraction!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = list(parameters_requiring_grad(model))
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True")
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self._numels = [p.numel() for p in self.params]
        self.dim = sum(self._numels)
        self.n_hvp = 0
        self._grads: list[torch.Tensor] | None = None  # cached gradient (with graph), or None
        self._grad_index: list[int] = []  # which parameters' gradients have a graph

        with gradients_enabled(), preserved_module_state(model), _private_buffers(model):
            n_local = self._build_cache(cache, cache_memory_fraction) if cache else self._count()
        total = all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64, device=self.device))
        self.n_samples = int(total.item())
        if self.n_samples == 0:
            self.release()
            raise ValueError("no samples: every batch on every rank is empty")
        self.cached = self._grads is not None or (cache is not False and n_local == 0)

    # -- data ---------------------------------------------------------------------------------

    def _prepared(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs on the model's device, cloned if made under inference mode (else unsaveable)."""
        x = x.to(self.device)
        y = y.to(self.device)
        x = x.clone() if x.is_inference() else x
        y = y.clone() if y.is_inference() else y
        return x, y

    def _count(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def _summed_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``n_b · loss_fn(model(x), y)``: the batch's sum of per-sample losses."""
        x, y = self._prepared(x, y)
        return len(x) * self.loss_fn(self.model(x), y)

    def _gradient(self, loss_sum: torch.Tensor) -> None:
        """Keep ``∂(loss_sum)/∂θ`` with its graph (only the entries that depend on θ)."""
        grads = torch.autograd.grad(loss_sum, self.params, create_graph=True, allow_unused=True)
        self._grad_index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._grad_index]

    def _build_cache(self, cache: bool | str, fraction: float) -> int:
        """One forward + first backward over all local batches, graphs kept; returns n_local."""
        n_local, total = 0, None
        meter = _SavedBytes()
        for x, y in self.batches:
            if len(x) == 0:
                continue
            if cache == "auto" and n_local == 0:
                with meter.context():
                    first = self._summed_loss(x, y)
                    torch.autograd.grad(first, self.params, create_graph=True, allow_unused=True)
                n_all = self._count()
                # about 2x: the gradient graph of the whole data is built again below
                if 2 * meter.bytes * n_all / len(x) > fraction * _available_memory(self.device):
                    return n_all
                loss_b = first
            else:
                loss_b = self._summed_loss(x, y)
            total = loss_b if total is None else total + loss_b
            n_local += len(x)
        if total is not None and total.requires_grad:
            self._gradient(total)
        return n_local

    def release(self) -> None:
        """Free the cached graphs (later products recompute, as with ``cache=False``)."""
        self._grads = None
        self._grad_index = []
        self.cached = False

    # -- products -----------------------------------------------------------------------------

    def _views(self, v: torch.Tensor, batch: int | None = None) -> list[torch.Tensor]:
        """Split a flat vector (``batch=None``) or a ``(b, dim)`` block into parameter shapes."""
        parts = torch.split(v, self._numels, dim=-1)
        if batch is None:
            return [t.view_as(p) for t, p in zip(parts, self.params, strict=True)]
        return [t.reshape(batch, *p.shape) for t, p in zip(parts, self.params, strict=True)]

    def _second_backward(
        self, grads: list[torch.Tensor], index: list[int], v: torch.Tensor, batched: int | None, retain: bool
    ) -> torch.Tensor:
        """``∂(g·v)/∂θ`` through kept gradient graphs, flattened (zeros where unused)."""
        views = self._views(v, batched)
        hv = torch.autograd.grad(
            grads,
            self.params,
            grad_outputs=[views[i] for i in index],
            retain_graph=retain,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched is not None,
        )
        return torch.cat([h.reshape(batched, -1) if batched else h.reshape(-1) for h in hv], dim=-1)

    def _local_products(self, v: torch.Tensor, batched: int | None) -> torch.Tensor:
        """Σ over this rank's batches of ``n_b · H_b v`` (not yet divided by N, not reduced)."""
        shape = (batched, self.dim) if batched else (self.dim,)
        out = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._grads is not None:
            if self._grads:
                out += self._second_backward(self._grads, self._grad_index, v, batched, retain=True)
            return out
        if self.cached:  # cache on, but this rank has no sample: contributes zero
            return out
        with preserved_module_state(self.model):  # same BN stats / dropout masks every product
            for x, y in self.batches:
                if len(x) == 0:
                    continue
                loss_b = self._summed_loss(x, y)
                if not loss_b.requires_grad:
                    continue
                grads = torch.autograd.grad(loss_b, self.params, create_graph=True, allow_unused=True)
                index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if index:
                    out += self._second_backward([grads[i] for i in index], index, v, batched, retain=False)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``; returned in ``v``'s dtype and device.

        Computed in the model's dtype; one collective (all-reduce of the product) under DDP.
        """
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        with gradients_enabled():
            w = v.detach().to(device=self.device, dtype=self.dtype).clone()
            hv = all_reduce_sum(self._local_products(w, None)) / self.n_samples
        self.n_hvp += 1
        return hv.to(device=v.device, dtype=v.dtype)

    def matmat(self, vs: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """``H V`` for a ``(dim, b)`` block; one collective for the whole block.

        ``batched=True`` runs all columns through one vmapped second backward
        (``is_grads_batched``); ``False`` (default, faster on the CPU benchmarks, see
        ``benchmarks/hessian.py``) does one second backward per column.
        """
        if vs.dim() != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"V must have shape ({self.dim}, b), got {tuple(vs.shape)}")
        b = vs.shape[1]
        with gradients_enabled():
            w = vs.detach().to(device=self.device, dtype=self.dtype).T.contiguous()
            if batched:
                local = self._local_products(w, b)
            else:
                local = torch.stack([self._local_products(w[j], None) for j in range(b)])
            hv = all_reduce_sum(local) / self.n_samples
        self.n_hvp += b
        return hv.T.to(device=vs.device, dtype=vs.dtype)


# --------------------------------------------------------------------------------------------
# Layer 2: algorithms on an operator
# --------------------------------------------------------------------------------------------


@dataclass
class EigenResult:
    """Extreme eigenvalues of the Hessian.

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
        n_hvp: Hessian-vector products used (each over the whole data, all ranks).
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
    """A unit random vector, float64, identical on every rank (drawn from ``gen``, broadcast)."""
    v = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    broadcast_(v)
    return v / v.norm()


def _rademacher(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random ±1 entries (float64), identical on every rank."""
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(device=device, dtype=torch.float64)
    z = 2 * z - 1
    broadcast_(z)
    return z


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
    op: HessianOperator,
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
    start_hvp = op.n_hvp

    def converged(alphas: torch.Tensor, offdiag: torch.Tensor, beta: float) -> bool:
        if len(alphas) < n_wanted and len(alphas) < op.dim:
            return False
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, offdiag))
        res = (beta * s[-1]).abs()
        top, low = _wanted(theta, k, which, smallest)
        return bool((res[torch.cat([top, low])] <= tol * theta.abs().max()).all())

    device = op.device
    alphas, betas, basis = _lanczos(
        op.matvec, _gaussian(gen, op.dim, device), max_iter, lambda: _gaussian(gen, op.dim, device), converged
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
        n_hvp=op.n_hvp - start_hvp,
        n_iter=len(alphas),
        converged=ok,
        method="lanczos",
        eigenvectors=vecs,
        smallest_eigenvectors=low_vecs,
    )


def power_eigenvalues(
    op: HessianOperator,
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
    start_hvp = op.n_hvp
    found = _Basis(op.dim, op.device, capacity=k)
    values, residuals, all_ok, n_iter = [], [], True, 0
    for _ in range(k):
        v = found.orthogonalize(_gaussian(gen, op.dim, op.device))
        v = v / v.norm()
        theta, res = 0.0, math.inf
        for _ in range(max_iter):
            w = found.orthogonalize(op.matvec(v))
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
        n_hvp=op.n_hvp - start_hvp,
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
    op: HessianOperator,
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
    start_hvp = op.n_hvp
    samples = torch.empty(0, dtype=torch.float64)
    converged = False
    while len(samples) < max_samples:
        b = min(block, max_samples - len(samples))
        z = _rademacher(gen, (op.dim, b), op.device)
        hz = op.matmat(z) if b > 1 else op.matvec(z[:, 0]).unsqueeze(1)
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
        n_hvp=op.n_hvp - start_hvp,
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
    op: HessianOperator, *, n_steps: int = 80, n_vectors: int = 1, seed: int = 0
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
    start_hvp = op.n_hvp
    m = min(n_steps, op.dim)
    nodes = torch.zeros((n_vectors, m), dtype=torch.float64)
    weights = torch.zeros((n_vectors, m), dtype=torch.float64)
    for r in range(n_vectors):
        z = _rademacher(gen, (op.dim,), op.device)
        alphas, betas, _ = _lanczos(op.matvec, z / z.norm(), m, lambda: _gaussian(gen, op.dim, op.device))
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas[:-1]))
        nodes[r, : len(theta)] = theta
        weights[r, : len(theta)] = s[0] ** 2
    return DensityResult(nodes=nodes, weights=weights, n_hvp=op.n_hvp - start_hvp)


# --------------------------------------------------------------------------------------------
# Layer 3: one call on a model
# --------------------------------------------------------------------------------------------


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    which: str = "top",
    smallest: int = 0,
    method: str = "lanczos",
    tol: float | None = None,
    max_iter: int = 100,
    seed: int = 0,
    cache: bool | str = "auto",
    return_eigenvectors: bool = False,
) -> EigenResult:
    """The ``k`` largest (algebraic, ``which="top"``) Hessian eigenvalues, descending.

    Also the ``smallest`` lowest ones (``.smallest``, ascending) with ``method="lanczos"``.
    ``tol`` defaults to :data:`DEFAULT_TOL` (relative residual, Lanczos) or 1e-3 (power, as
    PyHessian); ``max_iter`` is the number of Lanczos steps, or of products per eigenvalue for
    power iteration. ``method="power"`` finds the largest magnitude eigenvalues (PyHessian
    parity). See :class:`HessianOperator` for ``batches``/``cache`` and distributed use, and
    :class:`EigenResult` for the fields. The model is left exactly as found.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if method == "power" and smallest:
        raise ValueError("smallest eigenvalues need method='lanczos'")
    with gradients_enabled(), preserved_module_state(model):
        op = HessianOperator(model, loss_fn, batches, cache=cache)
        try:
            if method == "power":
                return power_eigenvalues(
                    op, k, tol=1e-3 if tol is None else tol, max_iter=max_iter, seed=seed,
                    return_eigenvectors=return_eigenvectors,
                )  # fmt: skip
            return lanczos_eigenvalues(
                op, k, which=which, smallest=smallest, tol=DEFAULT_TOL if tol is None else tol,
                max_iter=max_iter, seed=seed, return_eigenvectors=return_eigenvectors,
            )  # fmt: skip
        finally:
            op.release()


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    rtol: float = 1e-2,
    min_samples: int = 10,
    max_samples: int = 500,
    block: int = 1,
    seed: int = 0,
    cache: bool | str = "auto",
) -> TraceResult:
    """Hutchinson estimate of ``tr(H)``; stops when ``stderr <= rtol·|trace|`` (see
    :func:`hutchinson_trace`). The model is left exactly as found."""
    with gradients_enabled(), preserved_module_state(model):
        op = HessianOperator(model, loss_fn, batches, cache=cache)
        try:
            return hutchinson_trace(
                op, rtol=rtol, min_samples=min_samples, max_samples=max_samples, block=block, seed=seed
            )
        finally:
            op.release()


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_steps: int = 80,
    n_vectors: int = 1,
    seed: int = 0,
    cache: bool | str = "auto",
) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (see :func:`lanczos_density`)."""
    with gradients_enabled(), preserved_module_state(model):
        op = HessianOperator(model, loss_fn, batches, cache=cache)
        try:
            return lanczos_density(op, n_steps=n_steps, n_vectors=n_vectors, seed=seed)
        finally:
            op.release()
