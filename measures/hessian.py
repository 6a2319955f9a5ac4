"""The Hessian of a model's loss as a linear operator, and one-call spectrum functions.

The loss is the sample-weighted mean over every sample of every batch (on every rank)::

    L(θ) = (1/N) Σ_b n_b · loss_fn(model(x_b), y_b),   N = Σ_b n_b  (summed over ranks)

where ``loss_fn`` returns a batch mean (e.g. ``nn.CrossEntropyLoss()``). The Hessian is taken
with respect to every parameter with ``requires_grad=True``, flattened in ``model.parameters()``
order. Pure torch (no Lightning), in two layers over the solvers of :mod:`measures.linalg` and
:mod:`measures.estimators`:

1. :class:`HessianOperator` -- the linear map ``v -> H v``. Each product is exact, never a
   finite difference, and never calls ``.backward()``: by double backprop (Pearlmutter:
   ``g = ∂L/∂θ`` with ``create_graph=True``, then ``H v = ∂(g·v)/∂θ``) or by forward-over-reverse
   (``torch.func.jvp`` of ``torch.func.grad``; ``hvp=``, see :mod:`measures.hvp`, and
   :func:`fastest_hvp` to time both). With double backprop and ``cache=True`` the forward pass and
   first backward are done once and kept, so each product is one second backward;
   ``cache=False`` recomputes them per product (data larger than memory). Under ``torch.distributed`` each rank sums its shard and the product is
   all-reduced over ``process_group`` (see :mod:`measures.distributed`), so every rank holds the
   same vector bit for bit.
2. One-call functions on a model: :func:`hessian_eigenvalues`, :func:`hessian_trace`,
   :func:`hessian_density`. They leave the model exactly as found (train/eval flags, ``.grad``,
   buffers, ``requires_grad``, global RNG) and work inside ``torch.no_grad()`` and
   ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from measures.distributed import ProcessGroup, all_reduce_sum, rank_world
from measures.estimators import (
    DensityResult,
    TraceResult,
    hutchinson_trace,
    lanczos_density,
    power_eigenvalues,
)
from measures.hvp import HVP_MODES, ForwardOverReverse, SavedBytes, available_memory, check_hvp, reason
from measures.linalg import DEFAULT_TOL, EigenResult, lanczos_eigenvalues
from measures.module_state import gradients_enabled, parameters_requiring_grad, preserved_module_state

__all__ = [
    "HessianOperator",
    "HvpChoice",
    "fastest_hvp",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# The Hessian as a linear operator
# --------------------------------------------------------------------------------------------


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
        hvp: ``"double_backward"`` (the above) or ``"forward_over_reverse"``
            (:class:`~measures.hvp.ForwardOverReverse`: per product and batch, one forward pass
            with tangents and its backward). Forward-over-reverse keeps no graph between products:
            ``cache`` is accepted and ignored (``cached`` is False), and the memory is that of one
            batch's product at a time, as with ``cache=False``.

    The operator is valid for the parameter values at construction: an in-place parameter
    update afterwards makes autograd raise on the next cached product. ``release()`` frees
    the cached graphs. Construction and every product run under ``gradients_enabled()``;
    forward passes run under ``preserved_module_state(model)``, so BatchNorm statistics and
    the global RNG are restored (and a train-mode dropout draws the same masks for every
    product, cached or not).

    Attributes:
        dim: number of Hessian rows (trainable parameter entries).
        n_samples: total number of samples (all ranks).
        n_hvp: Hessian-vector products done so far.
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
        process_group: ProcessGroup = None,
        hvp: str = "double_backward",
    ) -> None:
        check_hvp(hvp)
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        if not 0 < cache_memory_fraction <= 1:
            raise ValueError(f"cache_memory_fraction must be in (0, 1], got {cache_memory_fraction!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.process_group = process_group
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
        self.hvp = hvp
        self._fvr = ForwardOverReverse(model, loss_fn, self.params) if hvp == HVP_MODES[1] else None
        if self._fvr is not None:
            cache = False  # nothing to keep between forward-over-reverse products

        with gradients_enabled(), preserved_module_state(model), _private_buffers(model):
            n_local = self._build_cache(cache, cache_memory_fraction) if cache else self._count()
        total = all_reduce_sum(
            torch.tensor([float(n_local)], dtype=torch.float64, device=self.device), process_group
        )
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
        meter = SavedBytes()
        for x, y in self.batches:
            if len(x) == 0:
                continue
            if cache == "auto" and n_local == 0:
                with meter.context():
                    first = self._summed_loss(x, y)
                    torch.autograd.grad(first, self.params, create_graph=True, allow_unused=True)
                n_all = self._count()
                # about 2x: the gradient graph of the whole data is built again below
                if 2 * meter.bytes * n_all / len(x) > fraction * available_memory(self.device):
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

    def _views(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into parameter shapes."""
        return [t.view_as(p) for t, p in zip(torch.split(v, self._numels), self.params, strict=True)]

    def _second_backward(
        self, grads: list[torch.Tensor], index: list[int], v: torch.Tensor, retain: bool
    ) -> torch.Tensor:
        """``∂(g·v)/∂θ`` through kept gradient graphs, flattened (zeros where unused).

        ``v`` is one flat vector ``(dim,)``, or a block ``(b, dim)`` whose rows go through one
        batched backward (``is_grads_batched``), giving ``(b, dim)``.
        """
        if v.dim() == 1:
            views = self._views(v)
        else:
            views = [
                t.reshape(len(v), *p.shape)
                for t, p in zip(torch.split(v, self._numels, dim=1), self.params, strict=True)
            ]
        hv = torch.autograd.grad(
            grads,
            self.params,
            grad_outputs=[views[i] for i in index],
            retain_graph=retain,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=v.dim() == 2,
        )
        return torch.cat([h.reshape(*v.shape[:-1], -1) for h in hv], dim=-1)

    def _local_product(self, v: torch.Tensor) -> torch.Tensor:
        """Σ over this rank's batches of ``n_b · H_b v`` (not yet divided by N, not reduced).

        ``v``: ``(dim,)``, or ``(b, dim)`` for ``b`` products in one batched backward per batch.
        """
        out = torch.zeros_like(v)
        if self._grads is not None:
            if self._grads:
                out += self._second_backward(self._grads, self._grad_index, v, retain=True)
            return out
        if self.cached:  # cache on, but this rank has no sample: contributes zero
            return out
        with preserved_module_state(self.model):  # same BN stats / dropout masks every product
            for x, y in self.batches:
                if len(x) == 0:
                    continue
                if self._fvr is not None:
                    out += self._fvr(*self._prepared(x, y), v)
                    continue
                loss_b = self._summed_loss(x, y)
                if not loss_b.requires_grad:
                    continue
                grads = torch.autograd.grad(loss_b, self.params, create_graph=True, allow_unused=True)
                index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if index:
                    out += self._second_backward([grads[i] for i in index], index, v, retain=False)
        return out

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``H V`` for the columns of ``V`` (``(dim, b)``), as ``b`` products in one pass.

        Double backward: one batched second backward (``is_grads_batched``); forward-over-reverse:
        one ``vmap`` over the tangents. Same values as ``b`` calls of :meth:`matvec` (up to
        rounding), one collective. Whether a vector costs less this way depends on the model and
        the device (``benchmarks/hessian_products.py``), so the solvers use it only where vectors
        come in blocks anyway (Hutchinson's ``block``); Lanczos stays single-vector. Counts ``b``
        products.
        """
        if vs.dim() != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"V must have shape ({self.dim}, b), got {tuple(vs.shape)}")
        with gradients_enabled():
            w = vs.detach().T.to(device=self.device, dtype=self.dtype).contiguous()
            hv = all_reduce_sum(self._local_product(w), self.process_group) / self.n_samples
        self.n_hvp += vs.shape[1]
        return hv.T.to(device=vs.device, dtype=vs.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``; returned in ``v``'s dtype and device.

        Computed in the model's dtype; one collective (all-reduce of the product) under DDP.
        """
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        with gradients_enabled():
            w = v.detach().to(device=self.device, dtype=self.dtype).clone()
            hv = all_reduce_sum(self._local_product(w), self.process_group) / self.n_samples
        self.n_hvp += 1
        return hv.to(device=v.device, dtype=v.dtype)


@dataclasses.dataclass(frozen=True)
class HvpChoice:
    """What :func:`fastest_hvp` found: the faster mode, each mode's time, why one was not usable.

    ``ms``: milliseconds of one product of this rank's shard per mode, averaged over the ranks
    (``forward_over_reverse`` is absent when torch.func could not run the model); ``reason``: why
    forward-over-reverse failed (:func:`measures.hvp.reason`), else None.
    """

    mode: str
    ms: dict[str, float]
    reason: str | None = None


def _time_local_product(op: HessianOperator, v: torch.Tensor) -> float:
    """Seconds of one product of this rank's shard (no collective), after one product to warm up
    (lazy initialization, cuDNN's choice of algorithm)."""
    sync = torch.cuda.synchronize if op.device.type == "cuda" else lambda *_: None
    op._local_product(v)
    sync(op.device)
    start = time.perf_counter()
    op._local_product(v)
    sync(op.device)
    return time.perf_counter() - start


def fastest_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    cache: bool | str = "auto",
    process_group: ProcessGroup = None,
) -> HvpChoice:
    """Time one product of each mode of :data:`~measures.hvp.HVP_MODES` on ``batches`` and return
    the faster (double backward with ``cache`` as the operator would use it: the time of a product,
    not of building the cache).

    A model torch.func cannot run makes it choose double backward and say why. Only this rank's
    products are timed, with no collective while a mode may fail; the times and failures are then
    summed over ``process_group``, so every rank takes the same decision. Runs in the model's
    current mode and leaves it as found.
    """
    batches = list(batches)
    times, why = torch.zeros(3, dtype=torch.float64), None
    with gradients_enabled(), preserved_module_state(model):
        for i, mode in enumerate(HVP_MODES):
            op = HessianOperator(model, loss_fn, batches, cache=cache, hvp=mode, process_group=process_group)
            g = torch.Generator().manual_seed(0)
            v = torch.randn(op.dim, generator=g, dtype=torch.float64).to(op.device, op.dtype)
            try:
                times[i] = _time_local_product(op, v)
            except Exception as e:  # noqa: BLE001 - whatever torch.func refuses makes the choice
                if mode == "double_backward":
                    raise
                times[2], why = 1.0, reason(e)
            finally:
                op.release()
    device = parameters_requiring_grad(model)[0].device
    total = all_reduce_sum(times.to(device), process_group).cpu()
    world = rank_world(process_group)[1]
    ms = {mode: 1e3 * float(total[i]) / world for i, mode in enumerate(HVP_MODES)}
    if total[2] > 0:
        ms.pop("forward_over_reverse")
        return HvpChoice("double_backward", ms, why or "forward-over-reverse failed on another rank")
    return HvpChoice(min(HVP_MODES, key=ms.__getitem__), ms)


# --------------------------------------------------------------------------------------------
# One call on a model
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hessian(
    model: nn.Module, loss_fn: LossFn, batches: Batches, cache: bool | str, process_group: ProcessGroup,
    hvp: str,
) -> Iterator[HessianOperator]:  # fmt: skip
    """The Hessian operator of one call, the model left exactly as found and the graphs freed after."""
    with gradients_enabled(), preserved_module_state(model):
        op = HessianOperator(model, loss_fn, batches, cache=cache, process_group=process_group, hvp=hvp)
        try:
            yield op
        finally:
            op.release()


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
    process_group: ProcessGroup = None,
    stop: str = "eigenvalue",
    hvp: str = "double_backward",
    **lanczos,
) -> EigenResult:
    """The ``k`` largest (algebraic, ``which="top"``) Hessian eigenvalues, descending.

    Also the ``smallest`` lowest ones (``.smallest``, ascending) with ``method="lanczos"``.
    ``tol`` defaults to :data:`DEFAULT_TOL` (Lanczos: every reported eigenvalue within ``tol ·
    |λ_1|``, by the error estimate; ``stop="residual"`` for the former residual stop) or 1e-3
    (power, as PyHessian); ``max_iter`` is the number of Lanczos steps, or of products per
    eigenvalue for power iteration. ``method="power"`` finds the largest magnitude eigenvalues
    (PyHessian parity). Further keywords (``confirm``, ``start``, ``start_mix``, ``guard``,
    ``return_start``, ``progress``) go to :func:`~measures.linalg.lanczos_eigenvalues`. See
    :class:`HessianOperator` for ``batches``/``cache``/``process_group``/``hvp``, and
    :class:`EigenResult` for the fields. The model is left exactly as found.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if method == "power" and (smallest or lanczos):
        raise ValueError(f"smallest eigenvalues and {sorted(lanczos)} need method='lanczos'")
    with _hessian(model, loss_fn, batches, cache, process_group, hvp) as op:
        if method == "power":
            return power_eigenvalues(
                op, k, tol=1e-3 if tol is None else tol, max_iter=max_iter, seed=seed,
                return_eigenvectors=return_eigenvectors,
            )  # fmt: skip
        return lanczos_eigenvalues(
            op, k, which=which, smallest=smallest, tol=DEFAULT_TOL if tol is None else tol,
            max_iter=max_iter, seed=seed, return_eigenvectors=return_eigenvectors, stop=stop, **lanczos,
        )  # fmt: skip


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
    process_group: ProcessGroup = None,
    hvp: str = "double_backward",
) -> TraceResult:
    """Hutchinson estimate of ``tr(H)``; stops when ``stderr <= rtol·|trace|`` (see
    :func:`hutchinson_trace`). The model is left exactly as found."""
    with _hessian(model, loss_fn, batches, cache, process_group, hvp) as op:
        return hutchinson_trace(
            op, rtol=rtol, min_samples=min_samples, max_samples=max_samples, block=block, seed=seed
        )


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_steps: int = 80,
    n_vectors: int = 1,
    seed: int = 0,
    cache: bool | str = "auto",
    process_group: ProcessGroup = None,
    hvp: str = "double_backward",
) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (see :func:`lanczos_density`)."""
    with _hessian(model, loss_fn, batches, cache, process_group, hvp) as op:
        return lanczos_density(op, n_steps=n_steps, n_vectors=n_vectors, seed=seed)
