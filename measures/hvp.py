"""How a Hessian-vector product is computed, and what sizes its batches: pure torch.

:class:`~measures.hessian.HessianOperator` computes ``H v`` in one of two ways (:data:`HVP_MODES`),
both exact (no finite difference) and equal up to rounding:

- ``"double_backward"`` (Pearlmutter): ``g = ∂L/∂θ`` with ``create_graph=True``, then
  ``H v = ∂(g·v)/∂θ``; the forward graph and first backward can be kept, so a product is one
  second backward (the operator's ``cache``);
- ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` of the loss as a function
  of the parameters (``torch.func.functional_call``): one forward pass carrying tangents and its
  backward per product, nothing kept between products (:class:`ForwardOverReverse`).

Which is faster depends on the model and the device (forward-over-reverse is cheaper on a GPU for
convolutional nets, double backward often on a CPU): :func:`~measures.hessian.fastest_hvp` times
one product of each. torch.func cannot run every model (a forward that reads a tensor's data with
``.numpy()``, or writes into a tensor it captured): :func:`forward_over_reverse_error` finds out on
two samples.

:func:`auto_batch_size` chooses the samples per forward pass: :data:`CPU_BATCH_SIZE` on a CPU, on a
CUDA device as many as a share of its free memory holds, from the bytes autograd saves per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from measures.module_state import autograd_input, gradients_enabled, preserved_module_state

__all__ = [
    "CPU_BATCH_SIZE",
    "HVP_MODES",
    "ForwardOverReverse",
    "auto_batch_size",
    "available_memory",
    "batch_size_for_memory",
    "check_hvp",
    "forward_over_reverse_error",
    "reason",
]

HVP_MODES = ("double_backward", "forward_over_reverse")
"""The ways :class:`~measures.hessian.HessianOperator` computes a product."""

CPU_BATCH_SIZE = 250
"""Samples per forward pass on a CPU (:func:`auto_batch_size`)."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_hvp(hvp: str) -> None:
    """Refuse a mode that is not one of :data:`HVP_MODES`, naming them."""
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {', '.join(HVP_MODES)}, got {hvp!r}")


def reason(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> int:
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


class SavedBytes:
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


def _saved_bytes(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes saved by a forward pass and a first backward with ``create_graph`` on ``(x, y)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    meter = SavedBytes()
    with meter.context():
        loss = len(x) * loss_fn(model(autograd_input(x)), y)
        torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return meter.bytes


def batch_size_for_memory(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, free_bytes: float,
    *, memory_fraction: float = 0.25,
) -> int:  # fmt: skip
    """As many of the samples ``x`` as fit in ``memory_fraction`` of ``free_bytes``, at least 1.

    The bytes autograd saves for a forward pass and first backward (``create_graph``) of 4 and of
    8 samples give the bytes per sample and the fixed part (the parameters); a product needs about
    twice what that pass saves, so the default share leaves the other half of ``free_bytes`` free.
    Runs in the model's current mode (set it as it will be measured) and leaves it as found.
    """
    if len(x) <= 8:
        return max(len(x), 1)
    device = next(model.parameters()).device
    with gradients_enabled(), preserved_module_state(model):
        small, large = (_saved_bytes(model, loss_fn, x[:n].to(device), y[:n].to(device)) for n in (4, 8))
    per_sample = max((large - small) / 4, 1.0)
    fixed = max(small - 4 * per_sample, 0.0)
    return max(1, min(int((memory_fraction * free_bytes - fixed) / per_sample), len(x)))


def auto_batch_size(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> int:
    """Samples per forward pass of the products: :data:`CPU_BATCH_SIZE` unless the model is on a
    CUDA device; there, :func:`batch_size_for_memory` of the device's free memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    return batch_size_for_memory(model, loss_fn, x, y, available_memory(device))


# --------------------------------------------------------------------------------------------
# Forward-over-reverse products
# --------------------------------------------------------------------------------------------


class ForwardOverReverse:
    """``n_b · H_b v`` of one batch by ``torch.func.jvp`` of ``torch.func.grad``.

    The loss is ``n_b · loss_fn(model(x), y)`` as a function of ``params`` (those of ``model``
    with ``requires_grad``, in that order; the others and the buffers enter as constants). The
    model runs in the mode it is in; the buffers are cloned inside the transformed function, so a
    train-mode BatchNorm updates clones and the model's own buffers are untouched (the caller
    restores the RNG, as :func:`~measures.module_state.preserved_module_state` does). A parameter
    the loss does not use gets zeros. ``v`` is one flat vector ``(dim,)``, or ``(b, dim)`` for
    ``b`` products in one ``torch.func.vmap`` over the tangents (one forward pass carrying ``b``
    tangents, usually cheaper per vector than lone products: ``benchmarks/hessian_products.py``;
    random ops such as dropout draw the same values for every tangent, as a lone product would).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter]) -> None:
        names = {p: n for n, p in model.named_parameters()}
        self.model, self.loss_fn = model, loss_fn
        self.params = list(params)
        self.names = [names[p] for p in self.params]
        self._numels = [p.numel() for p in self.params]

    def _tangent(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self._numels)
        return {n: t.view_as(p) for n, t, p in zip(self.names, parts, self.params, strict=True)}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        buffers = dict(self.model.named_buffers())
        primals = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            own = {n: b.clone() for n, b in buffers.items()}  # made inside: BatchNorm may update them
            return len(x) * self.loss_fn(functional_call(self.model, {**own, **params}, (x,)), y)

        gradient = grad(loss)

        def product(w: torch.Tensor) -> torch.Tensor:
            _, out = jvp(gradient, (primals,), (self._tangent(w),))
            return torch.cat([out[n].reshape(-1) for n in self.names])

        if v.dim() == 1:
            return product(v)
        return vmap(product, randomness="same")(v)


def forward_over_reverse_error(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> str | None:
    """Why torch.func cannot compute a forward-over-reverse product of ``model`` on ``(x, y)``
    (:func:`reason` of the exception), or None when it can. Two products in one vmap (as
    ``matmat`` does them; a lone product needs less of torch.func) on the given samples (2 are
    enough), in the model's current mode; the model is left as found."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return "the model has no parameter with requires_grad=True"
    device = params[0].device
    with gradients_enabled(), preserved_module_state(model):
        x, y = autograd_input(x.to(device)), autograd_input(y.to(device))
        v = torch.ones(2, sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
        try:
            ForwardOverReverse(model, loss_fn, params)(x, y, v)
        except Exception as e:  # noqa: BLE001 - whatever torch.func refuses is the answer
            return reason(e)
    return None
