"""Curvature matrices beside the loss Hessian, as the same linear operators: pure torch.

Every operator here has the interface the solvers use (:class:`~measures.operators.LinearOperator`:
``dim``, ``device``, ``dtype``, ``matvec``, and ``matmat``), over the same sample-weighted mean
loss as :class:`~measures.hessian.HessianOperator`::

    L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i),   N = Σ over batches and ranks

with the products all-reduced over ``process_group`` (every rank gets the same vector), the
parameters in ``model.parameters()`` order (those with ``requires_grad``), the model used in the
mode it is in, and left as found (each product runs under ``preserved_module_state``).

- :class:`GGNOperator`: the generalized Gauss-Newton ``G = (1/N) Σ_i J_iᵀ H_i J_i`` with ``J_i`` the
  Jacobian of the network's outputs for sample i and ``H_i`` the Hessian of its loss in those
  outputs (softmax cross-entropy: ``diag(p) - ppᵀ``). Exact products by a Jacobian-vector product
  (``torch.func.jvp``, forward mode) and a vector-Jacobian product (``torch.func.vjp``): no double
  backprop through the network; ``H_i`` is applied by differentiating the loss in the outputs only.
- :class:`EmpiricalFisherOperator`: ``(1/N) Σ_i g_i g_iᵀ`` with ``g_i`` the gradient of sample i's
  loss (``torch.func.vmap(grad)``); products ``Σ_i g_i (g_iᵀ v) / N``.
- :class:`FisherMCOperator`: the same with ``g_i`` the gradient at a label drawn from the model's
  softmax, ``mc_samples`` labels per sample, each from :func:`measures.noise.sample_uniform` of the
  sample's index: the same labels on any number of devices and in any batch. In expectation it is
  the Fisher, which for softmax cross-entropy equals the GGN.
- :class:`DifferenceOperator`: ``A - B``, e.g. Hessian - GGN (the "functional" part).
- :func:`curvature_operator`: one of them by name (:data:`OPERATORS`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from measures.distributed import ProcessGroup, all_reduce_sum
from measures.hessian import HessianOperator
from measures.module_state import autograd_input, gradients_enabled, preserved_module_state
from measures.noise import sample_uniform

__all__ = [
    "OPERATORS",
    "DifferenceOperator",
    "EmpiricalFisherOperator",
    "FisherMCOperator",
    "GGNOperator",
    "curvature_operator",
]

OPERATORS = ("hessian", "ggn", "ef", "fisher", "functional")
"""The operators :func:`curvature_operator` builds: the loss Hessian, the GGN, the empirical
Fisher, the Monte-Carlo Fisher, and Hessian - GGN."""

FISHER_STREAM = 7_000
"""The :mod:`measures.noise` stream of the Fisher's sampled labels (draw s uses stream + s)."""


class _ModelOperator:
    """What the model-based operators share: the parameters, the data, the all-reduced products.

    ``batches``: ``(x, y)`` or ``(x, y, idx)`` tuples (this rank's shard; empty ones skipped).
    Subclasses give ``_local(v)``: the sum over this rank's samples of ``n_b · (product of batch b)``.
    """

    def __init__(self, model: nn.Module, loss_fn, batches: Iterable, *, process_group: ProcessGroup = None):
        self.model, self.loss_fn, self.process_group = model, loss_fn, process_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self._numels = [p.numel() for p in self.params]
        self.dim = sum(self._numels)
        self.n_hvp = 0
        self.batches = [tuple(autograd_input(t.to(self.device)) for t in b) for b in batches if len(b[0])]
        n_local = sum(len(b[0]) for b in self.batches)
        total = all_reduce_sum(
            torch.tensor([float(n_local)], dtype=torch.float64, device=self.device), process_group
        )
        self.n_samples = int(total.item())
        if self.n_samples == 0:
            raise ValueError("no samples: every batch on every rank is empty")

    def _param_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

    def _as_dict(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self._numels)
        return {n: t.view_as(p) for n, t, p in zip(self.names, parts, self.params, strict=True)}

    def _flat(self, tensors, lead: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.cat([t.reshape(*lead, -1) for t in tensors], dim=-1)

    def _outputs(self, x: torch.Tensor):
        """The network's outputs as a function of the parameters, on private copies of the buffers
        (a kept VJP graph must not see them restored in place; BatchNorm in train mode updates the copies)."""
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return lambda params: functional_call(self.model, {**buffers, **params}, (x,))

    def _local(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self) -> None:
        """Free what the operator cached (later products recompute it)."""

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``A V`` for the columns of ``V`` (``(dim, b)``): ``b`` products, one collective."""
        if vs.dim() != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"V must have shape ({self.dim}, b), got {tuple(vs.shape)}")
        with gradients_enabled(), preserved_module_state(self.model):
            w = vs.detach().to(device=self.device, dtype=self.dtype)
            local = torch.stack([self._local(w[:, j].contiguous()) for j in range(w.shape[1])], dim=1)
            out = all_reduce_sum(local, self.process_group) / self.n_samples
        self.n_hvp += vs.shape[1]
        return out.to(device=vs.device, dtype=vs.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat ``v`` of length ``dim``, in ``v``'s dtype and device; one collective."""
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]


class GGNOperator(_ModelOperator):
    """The generalized Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ H_i J_i`` (see the module).

    A product is, per batch: ``J v`` by forward mode (``torch.func.jvp``: one forward pass with
    tangents), ``H_loss (J v)`` by forward-over-reverse on the loss as a function of the outputs
    only (``n_b · loss_fn``, so ``H_loss`` is block diagonal over the samples), and ``Jᵀ u`` by
    ``torch.func.vjp``. With ``cache=True`` each batch's outputs and VJP function (its saved
    activations: memory as a training step) are kept, so a product costs one forward with
    tangents and one backward.
    """

    def __init__(self, model, loss_fn, batches, *, cache: bool = True, process_group: ProcessGroup = None):
        super().__init__(model, loss_fn, batches, process_group=process_group)
        self.cache = bool(cache)
        self._vjps: list | None = None

    def _vjp(self, x: torch.Tensor):
        with gradients_enabled(), preserved_module_state(self.model):
            z, fn = vjp(self._outputs(x), self._param_dict())
        return z.detach(), fn

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        if self.cache and self._vjps is None:
            self._vjps = [self._vjp(b[0]) for b in self.batches]
        out = torch.zeros_like(v)
        tangent = self._as_dict(v)
        for i, (x, y, *_) in enumerate(self.batches):
            _, jv = jvp(self._outputs(x), (self._param_dict(),), (tangent,))
            z, fn = self._vjps[i] if self.cache else self._vjp(x)
            n = len(x)
            _, hjv = jvp(grad(lambda o, y=y, n=n: n * self.loss_fn(o, y)), (z,), (jv.detach(),))
            (back,) = fn(hjv)
            out += self._flat(back[name] for name in self.names)
        return out

    def release(self) -> None:
        self._vjps = None


class EmpiricalFisherOperator(_ModelOperator):
    """The empirical Fisher ``(1/N) Σ_i g_i g_iᵀ`` from per-sample gradients (see the module).

    ``cache=True`` keeps this rank's per-sample gradients (``n_local × dim`` entries), so a
    product is two matrix-vector products; ``False`` recomputes them per product, batch by batch.
    """

    def __init__(self, model, loss_fn, batches, *, cache: bool = True, process_group: ProcessGroup = None):
        super().__init__(model, loss_fn, batches, process_group=process_group)
        self.cache = bool(cache)
        self._grads: list[torch.Tensor] | None = None

    def _labels(self, batch: tuple) -> list[torch.Tensor]:
        """The labels whose gradients make the outer products: the data's own here."""
        return [batch[1]]

    def _sample_gradients(self, batch: tuple) -> torch.Tensor:
        """``(m · n_b, dim)`` per-sample gradients (``m`` label draws), scaled so that the sum of
        their outer products is ``n_b ×`` the batch's matrix."""
        x = batch[0]
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}

        def outputs(params, xi):
            return functional_call(self.model, {**buffers, **params}, (xi,))

        def one(params, xi, yi):
            return self.loss_fn(outputs(params, xi[None]), yi[None])

        labels = self._labels(batch)
        with gradients_enabled(), preserved_module_state(self.model):
            rows = [
                self._flat(
                    vmap(grad(one), in_dims=(None, 0, 0), randomness="same")(
                        self._param_dict(), x, y
                    ).values(),
                    (len(x),),
                )
                for y in labels
            ]
        return torch.cat(rows) / len(labels) ** 0.5

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        if self.cache and self._grads is None:
            self._grads = [self._sample_gradients(b) for b in self.batches]
        out = torch.zeros_like(v)
        for i, b in enumerate(self.batches):
            g = self._grads[i] if self.cache else self._sample_gradients(b)
            out += g.T @ (g @ v)
        return out

    def release(self) -> None:
        self._grads = None


class FisherMCOperator(EmpiricalFisherOperator):
    """The Fisher with labels drawn from the model's softmax (Monte Carlo; see the module).

    ``batches`` must carry each sample's index (``(x, y, idx)``): draw ``s`` of sample ``i`` is
    the inverse CDF of its softmax at ``sample_uniform([i], seed, FISHER_STREAM + s)``, so the
    matrix is the same however the samples are batched or sharded. ``(1/(N m)) Σ_i Σ_s g_is g_isᵀ``.
    """

    def __init__(
        self, model, loss_fn, batches, *, mc_samples: int = 1, seed: int = 0, cache: bool = True,
        process_group: ProcessGroup = None,
    ):  # fmt: skip
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples!r}")
        super().__init__(model, loss_fn, batches, cache=cache, process_group=process_group)
        if any(len(b) < 3 for b in self.batches):
            raise ValueError("the Monte-Carlo Fisher needs each sample's index: batches of (x, y, idx)")
        self.mc_samples, self.seed = mc_samples, seed

    def _labels(self, batch: tuple) -> list[torch.Tensor]:
        return sampled_labels(self.model, batch[0], batch[2], self.mc_samples, self.seed)


def sampled_labels(model: nn.Module, x: torch.Tensor, idx: torch.Tensor, mc_samples: int, seed: int):
    """``mc_samples`` label vectors drawn from ``softmax(model(x))``, each a function of (seed, index)."""
    with torch.no_grad(), preserved_module_state(model):
        cdf = torch.softmax(model(x).to(torch.float64), dim=-1).cumsum(-1)
    labels = []
    for s in range(mc_samples):
        u = sample_uniform(idx, seed, FISHER_STREAM + s, 1, torch.float64, cdf.device)
        labels.append(torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1)[:, 0])
    return labels


class DifferenceOperator:
    """``A - B`` of two operators of the same size (e.g. Hessian - GGN); each product costs both."""

    def __init__(self, a, b) -> None:
        if a.dim != b.dim:
            raise ValueError(f"operators of different sizes: {a.dim} and {b.dim}")
        self.a, self.b = a, b
        self.dim, self.device = a.dim, a.device
        self.dtype = getattr(a, "dtype", torch.float64)
        self.n_hvp = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_hvp += 1
        return self.a.matvec(v) - self.b.matvec(v)

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        self.n_hvp += vs.shape[1]
        mm = [getattr(o, "matmat", None) for o in (self.a, self.b)]
        a, b = (
            m(vs) if m else torch.stack([o.matvec(c) for c in vs.T], 1)
            for m, o in zip(mm, (self.a, self.b), strict=True)
        )
        return a - b

    def release(self) -> None:
        for o in (self.a, self.b):
            o.release()


def curvature_operator(
    name: str, model: nn.Module, loss_fn, batches, *, cache: bool | str = "auto", seed: int = 0,
    mc_samples: int = 1, process_group: ProcessGroup = None, hvp: str = "double_backward",
):  # fmt: skip
    """The operator ``name`` (:data:`OPERATORS`) of ``loss_fn`` on ``batches``; ``release()`` frees it.

    ``batches`` as :class:`~measures.hessian.HessianOperator` takes them, with each sample's index
    as a third element for ``"fisher"``. ``cache``: the Hessian's own rule (``"auto"``), True for
    the others unless False. ``hvp``: how the Hessian's products are computed (``"hessian"`` and
    ``"functional"``; :data:`measures.hvp.HVP_MODES`).
    """
    if name not in OPERATORS:
        raise ValueError(f"operator must be one of {', '.join(OPERATORS)}, got {name!r}")
    batches = list(batches)
    keep = cache is not False
    if name == "hessian":
        return HessianOperator(
            model, loss_fn, [b[:2] for b in batches], cache=cache, process_group=process_group, hvp=hvp
        )
    if name == "ggn":
        return GGNOperator(model, loss_fn, batches, cache=keep, process_group=process_group)
    if name == "ef":
        return EmpiricalFisherOperator(model, loss_fn, batches, cache=keep, process_group=process_group)
    if name == "fisher":
        return FisherMCOperator(
            model, loss_fn, batches, mc_samples=mc_samples, seed=seed, cache=keep, process_group=process_group
        )
    hessian = HessianOperator(
        model, loss_fn, [b[:2] for b in batches], cache=cache, process_group=process_group, hvp=hvp
    )
    return DifferenceOperator(
        hessian, GGNOperator(model, loss_fn, batches, cache=keep, process_group=process_group)
    )
