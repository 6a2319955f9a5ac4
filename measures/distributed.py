"""The collectives the measurements use, with the process group as an explicit argument.

Every measurement function that sums over ranks takes ``process_group``:

- ``None`` (default): torch's default process group when one is initialized (e.g. by a DDP
  Trainer), else no collective at all: a plain single-process call;
- ``"local"``: this rank alone, never a collective (measure on one rank without the others);
- a ``torch.distributed.ProcessGroup``: that group.

All ranks of the group must make the same calls in the same order: a function that runs a
collective on one rank runs it on every rank.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup | Literal["local"] | None

LOCAL: Literal["local"] = "local"


def rank_world(process_group: ProcessGroup = None) -> tuple[int, int]:
    """(rank, world size) within ``process_group``; (0, 1) when it is local or not initialized."""
    if process_group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _backend_buffer(t: torch.Tensor, process_group: ProcessGroup) -> torch.Tensor:
    """``t`` on the device the group's backend reduces on (gloo: CPU, NCCL: CUDA)."""
    backend = dist.get_backend(process_group)
    if backend == "nccl" and not t.is_cuda:
        return t.cuda()
    if backend == "gloo" and t.is_cuda:
        return t.cpu()
    return t


def all_reduce_sum(t: torch.Tensor, process_group: ProcessGroup = None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``process_group`` (in place, returned); identity when local."""
    if rank_world(process_group)[1] == 1:
        return t
    buf = _backend_buffer(t, process_group)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def shard_for_rank(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of ``indices``: contiguous blocks, no sample on two ranks, none dropped.

    Unlike ``DistributedSampler``, nothing is padded, so counts and sample-weighted means
    summed over ranks are exactly those of the whole index list.
    """
    bounds = [len(indices) * r // world for r in range(world + 1)]
    return indices[bounds[rank] : bounds[rank + 1]]
