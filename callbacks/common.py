"""Small helpers shared by the measurement callbacks and functions (no Lightning import).

Everything distributed goes through here so that all ranks run the same collectives in
the same order: a function that is called on one rank is called on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place, returned); identity without a process group.

    gloo reduces CPU tensors only and NCCL CUDA tensors only, so the tensor is moved to
    the backend's device for the collective and back afterwards.
    """
    rank, world = dist_rank_world()
    if world == 1:
        return t
    backend = dist.get_backend()
    if backend == "nccl" and not t.is_cuda:
        buf = t.cuda()
    elif backend == "gloo" and t.is_cuda:
        buf = t.cpu()
    else:
        buf = t
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value (identity without a group)."""
    _, world = dist_rank_world()
    if world == 1:
        return t
    buf = t.cuda() if dist.get_backend() == "nccl" and not t.is_cuda else t
    buf = buf.cpu() if dist.get_backend() == "gloo" and buf.is_cuda else buf
    dist.broadcast(buf, src=src)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def fixed_subset_indices(n_total: int, size: int | None, seed: int) -> torch.Tensor:
    """The same ``size`` indices of a dataset of ``n_total`` items for every run and epoch.

    ``size=None`` (or a size >= n_total) means the whole dataset, in order. The choice
    uses its own generator, so the global RNG is untouched.
    """
    if size is None or size >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:size].sort().values


def shard_for_rank(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of ``indices``: contiguous blocks, no sample on two ranks, none dropped.

    Unlike ``DistributedSampler``, nothing is padded, so counts and sample-weighted means
    summed over ranks are exactly those of the whole index list.
    """
    bounds = [len(indices) * r // world for r in range(world + 1)]
    return indices[bounds[rank] : bounds[rank + 1]]


def load_items(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset[i]`` for ``i`` in ``indices`` into (inputs, targets) tensors."""
    if len(indices) == 0:
        x0, _ = dataset[0]
        return torch.empty((0, *torch.as_tensor(x0).shape)), torch.empty(0, dtype=torch.long)
    xs, ys = zip(*(dataset[int(i)] for i in indices), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def split_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, extra: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, ...]]:
    """Cut (x, y[, extra]) into consecutive batches of at most ``batch_size`` samples."""
    out = []
    for s in range(0, len(x), batch_size):
        part = (x[s : s + batch_size], y[s : s + batch_size])
        out.append(part if extra is None else (*part, extra[s : s + batch_size]))
    return out


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Allow autograd inside any Lightning hook: leaves ``inference_mode`` and ``no_grad``.

    Tensors created under inference mode must still be cloned before they are saved for
    backward; callers clone their inputs.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


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
