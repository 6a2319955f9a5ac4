"""The training loader and its sampler: exact global batches on any device count, resumable
mid-epoch at the exact batch (:class:`GlobalBatchSampler`, :class:`ResumableLoader`); the same
batches gathered from tensors on the device (:class:`DeviceLoader`, :class:`DeviceEvalLoader`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from measures.distributed import shard_for_rank


class EpochPermutation(Sampler[int]):
    """The training set's order in one epoch: a permutation drawn from (seed, epoch), or 0..n-1.

    :class:`GlobalBatchSampler` cuts it into batches and exposes it as its ``sampler``, where
    Lightning's fit loop finds ``set_epoch`` at the start of every epoch (it looks on
    ``loader.sampler`` and ``loader.batch_sampler.sampler``, not on the batch sampler itself).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.n


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's part of each *global* batch, so 1 and N devices see the same batches.

    Each epoch draws one permutation of the training set from (seed, epoch); global batch k is
    ``perm[k*B:(k+1)*B]`` and rank r takes the r-th of ``world`` equal slices of it, then cuts
    that slice into micro-batches (gradient accumulation). A last global batch smaller than
    ``world`` samples is dropped (every rank must take a step), and so is any last partial
    batch when ``drop_last``. The epoch comes from Lightning through :attr:`sampler`
    (:class:`EpochPermutation`), or from :meth:`set_epoch` in a plain loop.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int,
        world: int,
        seed: int,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        self.n, self.batch_size, self.micro = n, batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.sampler = EpochPermutation(n, seed, shuffle)
        self._skip = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _global_batches(self) -> list[torch.Tensor]:
        batches = list(self.sampler.permutation().split(self.batch_size))
        if batches and (
            len(batches[-1]) < self.world or (self.drop_last and len(batches[-1]) < self.batch_size)
        ):
            batches.pop()
        return batches

    def skip_next(self, batches: int) -> None:
        """Start the next iteration (only) after its first ``batches`` batches of this rank."""
        self._skip = batches

    def layout(self) -> dict:
        """What fixes the batches of an epoch (``rank`` aside): a resumed position is only valid
        under the same layout."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro,
            "world": self.world,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def index_batches(self) -> list[torch.Tensor]:
        """This rank's batches of the epoch as index tensors, after the skip of :meth:`skip_next`
        (which they use up): what an iteration yields, as lists."""
        skip, self._skip = self._skip, 0
        mine = (
            m
            for gb in self._global_batches()
            for m in shard_for_rank(gb, self.rank, self.world).split(self.micro)
        )
        return list(itertools.islice(mine, skip, None))

    def __iter__(self) -> Iterator[list[int]]:
        # read at the first next(), not at iter(): a DataLoader with workers makes (and drops) an
        # iterator before the one it reads
        yield from (m.tolist() for m in self.index_batches())

    def __len__(self) -> int:
        return sum(
            -(-len(shard_for_rank(gb, self.rank, self.world)) // self.micro) for gb in self._global_batches()
        )


class ResumableLoader(DataLoader):
    """The training loader over a :class:`GlobalBatchSampler`, resumable mid-epoch at the exact batch.

    Lightning saves the ``state_dict()`` of every training loader that has ``state_dict`` and
    ``load_state_dict`` (``lightning_fabric``'s ``_Stateful``) in its checkpoints
    (``loops.fit_loop.state_dict.combined_loader``), and hands it back to :meth:`load_state_dict`
    when it resumes from a checkpoint taken inside an epoch (see also
    :func:`restore_loader_states`). The state is the epoch and the number of batches this loader
    has handed to training in it (counted here, not in the sampler, which DataLoader workers read
    ahead), with the sampler's :meth:`GlobalBatchSampler.layout`. The first iteration after
    loading, if it is in that epoch, starts right after those batches (none, if the epoch was
    done), so a resumed run trains on exactly the batches an uninterrupted run would have; the
    epoch's length stays the full length, as Lightning counts the batches already done itself.
    In a later epoch the position is ignored.

    ``epoch_of``: where the epoch comes from at the start of each iteration (the datamodule
    passes ``trainer.current_epoch``); else the sampler's, which Lightning sets from its
    ``epoch_progress.processed``: that runs one ahead of ``current_epoch`` once a run with
    ``max_steps`` has resumed from an epoch-end checkpoint, which would shift every later epoch
    to the next epoch's permutation.

    Resuming inside an epoch needs the same layout (device count, micro-batch, global batch,
    seed, data): Lightning's own counters are in micro-batches of the interrupted run. A checkpoint
    taken between the micro-batches of one optimizer step cannot be resumed exactly (the summed
    gradient is not in it); :class:`callbacks.mid_epoch_checkpoint.MidEpochCheckpoint` writes
    them on optimizer steps only.
    """

    batch_sampler: GlobalBatchSampler

    def __init__(self, *args, epoch_of: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_of = epoch_of
        if not isinstance(self.batch_sampler, GlobalBatchSampler):
            raise TypeError("ResumableLoader needs batch_sampler=GlobalBatchSampler(...)")
        self._epoch: int | None = None  # of the latest iteration; None: not iterated yet
        self._done, self._length = 0, 0
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        if self._epoch is None:
            position = {"epoch": self.batch_sampler.epoch, "batches": 0, "length": len(self.batch_sampler)}
        else:
            position = {"epoch": self._epoch, "batches": self._done, "length": self._length}
        return {**position, **self.batch_sampler.layout()}

    def load_state_dict(self, state: dict) -> None:
        now = self.batch_sampler.layout()
        changed = {k: (state[k], v) for k, v in now.items() if state[k] != v}
        if 0 < state["batches"] < state["length"] and changed:  # inside an epoch: only the same layout
            raise ValueError(
                f"the checkpoint was taken after batch {state['batches']} of {state['length']} of epoch "
                f"{state['epoch']} under another batch layout ({changed}, as (then, now)); resume it with "
                "the same devices, max_micro_batch, batch size, seed and data, or from an epoch-end checkpoint"
            )
        self._resume = dict(state)

    def __iter__(self) -> Iterator:
        return self._epoch_batches()  # runs at the first next(), after Lightning's set_epoch

    def _epoch_batches(self) -> Iterator:
        sampler = self.batch_sampler
        if self.epoch_of is not None:
            sampler.set_epoch(self.epoch_of())
        epoch, skip, resume, self._resume = sampler.epoch, 0, self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            skip = len(sampler) if resume["batches"] >= resume["length"] else resume["batches"]
        elif resume is not None and 0 < resume["batches"] < resume["length"]:
            raise RuntimeError(
                f"resuming inside epoch {resume['epoch']} of the loader, but training resumes in epoch {epoch}"
            )
        self._epoch, self._done, self._length = epoch, skip, len(sampler)
        sampler.skip_next(skip)
        for batch in self._batches():
            self._done += 1
            yield batch

    def _batches(self) -> Iterator:
        """The epoch's batches (after the sampler's skip): the DataLoader's own iteration."""
        return super().__iter__()


def draw_like_a_dataloader_iterator() -> None:
    """Draw what a ``DataLoader`` iterator draws from the global generator when it is made (its
    workers' base seed, also with no workers), so a loader that is no DataLoader iteration leaves
    the global random stream where the DataLoader path leaves it (dropout, adversarial starts and
    augmentation then draw the same numbers on both paths)."""
    torch.empty((), dtype=torch.int64).random_()


class DeviceLoader(ResumableLoader):
    """:class:`ResumableLoader` whose batches are gathered from tensors already on the device.

    ``dataset`` (:class:`lightning_modules.datasets.ImageTensorDataset`) lives on the training
    device; each epoch this rank's batch indices (:meth:`GlobalBatchSampler.index_batches`: the
    same batches, shards and resume point as the DataLoader path) are copied there once, and each
    batch is one index gather (:meth:`~lightning_modules.datasets.ImageTensorDataset.batch`):
    no per-item collate, no per-step copy of the images. ``workers``: the ``num_workers`` the
    DataLoader path would have; its persistent iterator draws its seed once, else once an epoch
    (:func:`draw_like_a_dataloader_iterator`).
    """

    def __init__(self, dataset, batch_sampler: GlobalBatchSampler, workers: int = 0, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.workers, self._drawn = workers, False

    def _batches(self) -> Iterator:
        if self.workers == 0 or not self._drawn:
            draw_like_a_dataloader_iterator()
            self._drawn = True
        batches = self.batch_sampler.index_batches()
        if not batches:
            return
        device = self.dataset.targets.device
        for idx in torch.cat(batches).to(device).split([len(b) for b in batches]):
            yield self.dataset.batch(idx)


class DeviceEvalLoader(DataLoader):
    """An evaluation loader over the samples ``start..stop-1`` of a dataset on the device: the
    batches of ``DataLoader(Subset(dataset, range(start, stop)), batch_size)``, each one slice."""

    def __init__(self, dataset, start: int, stop: int, batch_size: int):
        super().__init__(torch.utils.data.Subset(dataset, range(start, stop)), batch_size=batch_size)
        self.images_of, self.start, self.stop = dataset, start, stop

    def __iter__(self) -> Iterator:
        draw_like_a_dataloader_iterator()  # a DataLoader makes its iterator (and draws) here, not at next()
        return self._slices()

    def _slices(self) -> Iterator:
        for s in range(self.start, self.stop, self.batch_size):
            yield self.images_of.batch(slice(s, min(s + self.batch_size, self.stop)))


def restore_loader_states(trainer: pl.Trainer) -> None:
    """Hand the checkpoint's training-loader states to the loaders, where Lightning 2.6 drops them.

    When ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (as the schedules
    of :class:`lightning_modules.module.SGDClassifier` do), Lightning loads the training loader
    before it restores the checkpoint's loop state, and then never calls the loader's
    ``load_state_dict`` (pytorch-lightning issue #20550): a run resumed inside an epoch would
    train on that epoch's first batches again. Call this from ``on_train_start``: after the
    restore, before the first batch (:class:`ResumableLoader` reads its state at its first
    batch). It loads only what Lightning left pending, so it is a no-op when Lightning did it.
    """
    trainer.fit_loop._load_combined_loader_states()
