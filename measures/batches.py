"""The fixed samples a measurement runs on, this rank's share of them, and their batches.

A measurement compares epochs and runs only if it sees the same samples every time: a seeded
choice of ``size`` items (:func:`fixed_subset_indices`), split across ranks in contiguous blocks
with nothing padded or repeated (:func:`~measures.distributed.shard_for_rank`), so sums over
ranks equal the single-process sums.
"""

from __future__ import annotations

import torch

from measures.distributed import shard_for_rank


def fixed_subset_indices(n_total: int, size: int | None, seed: int) -> torch.Tensor:
    """The same ``size`` indices of a dataset of ``n_total`` items for every run and epoch.

    ``size=None`` (or a size >= n_total) means the whole dataset, in order. The choice
    uses its own generator, so the global RNG is untouched.
    """
    if size is None or size >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:size].sort().values


def load_items(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset[i]`` for ``i`` in ``indices`` into (inputs, targets) tensors."""
    if len(indices) == 0:
        x0, _ = dataset[0]
        return torch.empty((0, *torch.as_tensor(x0).shape)), torch.empty(0, dtype=torch.long)
    xs, ys = zip(*(dataset[int(i)] for i in indices), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def load_rank_subset(dataset, size: int | None, seed: int, rank: int, world: int):
    """(x, y, idx) of this rank's block of the fixed subset: the same samples every epoch and run."""
    mine = shard_for_rank(fixed_subset_indices(len(dataset), size, seed), rank, world)
    return (*load_items(dataset, mine), mine)


def split_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, extra: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, ...]]:
    """Cut (x, y[, extra]) into consecutive batches of at most ``batch_size`` samples."""
    out = []
    for s in range(0, len(x), batch_size):
        part = (x[s : s + batch_size], y[s : s + batch_size])
        out.append(part if extra is None else (*part, extra[s : s + batch_size]))
    return out
