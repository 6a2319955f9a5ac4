"""Leave a model exactly as found after measuring it, and allow autograd inside any hook.

Lightning runs validation under ``no_grad`` (fit) or ``inference_mode`` (``validate``/``test``),
and gloo forces ``no_grad`` on every eval loop: a measurement that differentiates wraps its work
in :func:`gradients_enabled`. :func:`preserved_module_state` restores everything a measurement
could disturb.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Allow autograd inside any Lightning hook: leaves ``inference_mode`` and ``no_grad``.

    Tensors created under inference mode must still be cloned before they are saved for
    backward; callers clone their inputs.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def autograd_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` usable in an autograd graph: inference tensors are cloned, others detached."""
    return t.clone() if t.is_inference() else t.detach()


@contextlib.contextmanager
def preserved_module_state(model: nn.Module, mode: str | None = None) -> Iterator[None]:
    """Run a measurement on ``model`` and leave it exactly as found.

    Restores: the train/eval flag of every submodule, every parameter's ``.grad`` (values
    and ``None``-ness), every buffer's value, every parameter's ``requires_grad``, and the
    global CPU (and CUDA) RNG state. ``mode`` ("eval" / "train" / None = keep) sets the
    mode for the duration of the block.
    """
    training = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    requires = {p: p.requires_grad for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
    elif mode is not None:
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
    try:
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, g in grads.items():
            p.grad = g
            p.requires_grad_(requires[p])
        with torch.no_grad():
            for b, v in buffers.items():
                b.copy_(v)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def parameters_requiring_grad(model: nn.Module) -> Sequence[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
