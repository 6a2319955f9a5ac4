"""The data: embedded digits split, global batches on any device count, offline errors, augmentation."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.config import ConfigError
from lightning_modules.data import (
    DataUnavailable,
    DeviceEvalLoader,
    DeviceLoader,
    GlobalBatchSampler,
    ImageDataModule,
    ImageTensorDataset,
    ResumableLoader,
    load_mnist5k,
    load_torchvision,
)


def test_mnist5k_is_real_digits_split_stratified_and_fixed():
    images, targets = load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(targets).tolist() == [500] * 10
    dm = ImageDataModule("mnist5k")
    dm.setup()
    sizes = {k: len(dm.splits[k]) for k in ("train", "val", "test")}
    assert sizes == {"train": 4000, "val": 500, "test": 500}
    for split, per_class in (("train", 400), ("val", 50), ("test", 50)):
        assert torch.bincount(dm.splits[split].targets).tolist() == [per_class] * 10
    x, y = dm.splits["test"][0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    # no digit in two splits, and the same split every time
    flat = {k: {bytes(img.numpy()) for img in dm.splits[k].images} for k in ("train", "val", "test")}
    assert not (flat["train"] & flat["test"]) and not (flat["val"] & flat["test"])
    dm2 = ImageDataModule("mnist5k")
    dm2.setup()
    assert torch.equal(dm.splits["test"].images, dm2.splits["test"].images)


@pytest.mark.parametrize(
    "n,batch,world,micro", [(100, 32, 1, 32), (100, 32, 2, 16), (100, 32, 4, 4), (10, 8, 2, 4)]
)
def test_ranks_together_see_exactly_the_one_device_global_batches(n, batch, world, micro):
    one = list(GlobalBatchSampler(n, batch, batch, 0, 1, seed=3))
    per_rank = [list(GlobalBatchSampler(n, batch, micro, r, world, seed=3)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    steps = len(per_rank[0]) // (-(-batch // world // micro))
    for k in range(steps):
        merged = []
        chunks = len(per_rank[0]) // steps
        for r in range(world):
            for b in per_rank[r][k * chunks : (k + 1) * chunks]:
                merged += b
        assert sorted(merged) == sorted(one[k]), k
    s = GlobalBatchSampler(n, batch, batch, 0, 1, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # reshuffled each epoch
    assert len(per_rank[0]) == len(list(GlobalBatchSampler(n, batch, micro, 0, world, seed=3)))


def test_batches_are_the_documented_permutation_of_seed_and_epoch():
    n, batch, seed = 50, 8, 3
    s = GlobalBatchSampler(n, batch, batch, 0, 1, seed=seed)
    for epoch in (0, 4):
        s.set_epoch(epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert list(s) == [b.tolist() for b in perm.split(batch)]


class _RecordBatches(pl.LightningModule):
    """A one-weight model that records the sample indices (the dataset's values) of every batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append((self.current_epoch, x.long().tolist()))
        return (self.w * x.double()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(**kwargs) -> pl.Trainer:
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(accelerator="cpu", devices=1, use_distributed_sampler=False, **quiet, **kwargs)


def test_lightning_hands_the_epoch_to_the_sampler():
    # Lightning calls set_epoch on loader.sampler and loader.batch_sampler.sampler only
    n, batch = 12, 4
    loader = DataLoader(
        TensorDataset(torch.arange(n)), batch_sampler=GlobalBatchSampler(n, batch, batch, 0, 1, 0)
    )
    module = _RecordBatches()
    _trainer(max_epochs=3, enable_checkpointing=False).fit(module, loader)
    per_epoch = [[b for e, b in module.seen if e == epoch] for epoch in range(3)]
    for epoch, batches in enumerate(per_epoch):
        s = GlobalBatchSampler(n, batch, batch, 0, 1, 0)
        s.set_epoch(epoch)
        assert batches == list(s), epoch
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]


def _loader(n, batch, micro, rank, world, epoch, num_workers=0) -> ResumableLoader:
    loader = ResumableLoader(
        TensorDataset(torch.arange(n)),
        batch_sampler=GlobalBatchSampler(n, batch, micro, rank, world, seed=5),
        num_workers=num_workers,
    )
    loader.batch_sampler.set_epoch(epoch)
    return loader


def _indices(batches) -> list[list[int]]:
    return [x.tolist() for (x,) in batches]


@pytest.mark.parametrize(
    "n,batch,micro,world,k,num_workers",
    [
        (100, 16, 16, 1, 3, 0),  # one device
        (100, 16, 8, 1, 4, 0),  # micro-batches: 2 per optimizer step
        (100, 16, 4, 2, 6, 0),  # two ranks, 2 micro-batches each per step
        (100, 16, 4, 2, 6, 1),  # with a worker, which reads the sampler ahead
    ],
)
def test_loader_state_resumes_at_the_exact_batch(n, batch, micro, world, k, num_workers):
    for rank in range(world):
        full = _indices(_loader(n, batch, micro, rank, world, epoch=2))
        interrupted = _loader(n, batch, micro, 0, world, epoch=2, num_workers=num_workers)
        first = _indices(itertools.islice(iter(interrupted), k))
        state = interrupted.state_dict()  # Lightning saves rank 0's and loads it on every rank
        assert first == _indices(_loader(n, batch, micro, 0, world, epoch=2))[:k]
        assert state["epoch"] == 2 and state["batches"] == k and state["length"] == len(full)

        resumed = _loader(n, batch, micro, rank, world, epoch=0, num_workers=num_workers)
        resumed.load_state_dict(state)
        resumed.batch_sampler.set_epoch(2)  # as Lightning does before iterating
        assert len(resumed) == len(full)  # Lightning counts the k batches done itself
        rest = _indices(resumed)
        assert rest == full[k:] and len(rest) < len(full)
        assert resumed.state_dict()["batches"] == len(full)
        resumed.batch_sampler.set_epoch(3)  # the next epoch starts from its first batch
        assert _indices(resumed) == _indices(_loader(n, batch, micro, rank, world, epoch=3))


def test_loader_refuses_a_mid_epoch_position_of_another_layout_but_not_an_epoch_end():
    loader = _loader(100, 16, 8, 0, 1, epoch=1)
    assert loader.state_dict()["batches"] == 0 and loader.state_dict()["epoch"] == 1
    list(itertools.islice(iter(loader), 3))
    mid = loader.state_dict()
    assert (mid["epoch"], mid["batches"], mid["length"]) == (
        1,
        3,
        13,
    )  # 6 full global batches of 2 micro-batches, then 4 samples
    with pytest.raises(ValueError, match="micro_batch_size"):
        _loader(100, 16, 16, 0, 1, epoch=1).load_state_dict(mid)
    with pytest.raises(ValueError, match="world"):
        _loader(100, 16, 8, 0, 2, epoch=1).load_state_dict(mid)
    ended = {**mid, "batches": mid["length"]}
    other = _loader(100, 16, 16, 0, 1, epoch=0)
    other.load_state_dict(ended)
    other.batch_sampler.set_epoch(2)
    assert _indices(other) == _indices(_loader(100, 16, 16, 0, 1, epoch=2))
    stale = _loader(100, 16, 8, 0, 1, epoch=0)
    stale.load_state_dict(mid)  # a position inside epoch 1, but training goes on in epoch 2
    stale.batch_sampler.set_epoch(2)
    with pytest.raises(RuntimeError, match="epoch 1"):
        next(iter(stale))


def test_a_finished_epoch_position_yields_nothing_more_of_that_epoch():
    loader = _loader(100, 16, 8, 0, 1, epoch=1)
    list(loader)
    done = loader.state_dict()
    assert done["batches"] == done["length"] == 13
    again = _loader(100, 16, 8, 0, 1, epoch=1)  # Lightning may ask for one more batch of it
    again.load_state_dict(done)
    assert _indices(again) == []
    assert _indices(again) == _indices(_loader(100, 16, 8, 0, 1, epoch=1))  # loaded once


def test_datamodule_loader_takes_its_epoch_from_the_trainer():
    dm = ImageDataModule("mnist5k", batch_size=500)
    dm.setup()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=3)
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(4)  # Lightning's epoch_progress.processed can run one ahead
    expected = GlobalBatchSampler(4000, 500, 500, 0, 1, seed=0)
    expected.set_epoch(3)
    assert [y.tolist() for _, y in loader] == [dm.splits["train"].targets[b].tolist() for b in expected]


def test_augmentation_only_on_training_batches():
    dm = ImageDataModule("mnist5k", augment="crop_flip", crop_padding=2)
    dm.setup()
    torch.manual_seed(0)
    train_views = torch.stack([dm.splits["train"][0][0] for _ in range(8)])
    assert not all(torch.equal(train_views[0], v) for v in train_views)
    clean = dm.measurement_dataset("train")
    assert clean.augment == "none" and all(torch.equal(clean[0][0], clean[0][0]) for _ in range(4))
    assert dm.splits["test"].augment == "none" and dm.splits["val"].augment == "none"


def test_crop_keeps_shape_and_pixel_range():
    ds = ImageTensorDataset(
        torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4), "crop_flip"
    )
    for i in range(4):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize(
    "name,expected", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "cifar-10-python.tar.gz")]
)
def test_offline_without_files_says_which_files_to_put_where(tmp_path, name, expected):
    with pytest.raises(DataUnavailable) as e:
        load_torchvision(name, str(tmp_path), train=True, download=False)
    msg = str(e.value)
    assert expected in msg and str(tmp_path) in msg and "data=mnist5k" in msg


def test_torchvision_files_in_data_dir_are_loaded_in_pixel_space(tmp_path):
    """Write a tiny MNIST in the raw idx format torchvision reads, then load it through our path."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.numpy().tobytes()
        )
        labels = torch.arange(n, dtype=torch.uint8) % 10
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.numpy().tobytes()
        )
    images, targets = load_torchvision("mnist", str(tmp_path), train=False, download=False)
    assert images.shape == (4, 1, 28, 28) and targets.tolist() == [0, 1, 2, 3]


# ---- data.on_device: the same batches gathered from tensors on the device ------------------------
def _images(n: int = 37) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(7)
    return ImageTensorDataset(
        torch.randint(0, 256, (n, 1, 6, 5), dtype=torch.uint8, generator=g), torch.arange(n), crop_padding=2
    )


def _both_loaders(ds, batch, micro, rank, world, workers=0):
    """The DataLoader path and the gather path over ``ds`` (its CPU tensors), same layout."""

    def sampler():
        return GlobalBatchSampler(len(ds), batch, micro, rank, world, seed=5)

    return (
        ResumableLoader(ds, batch_sampler=sampler(), num_workers=workers, persistent_workers=workers > 0),
        DeviceLoader(ds, sampler(), workers=workers),
    )


def _epochs(loader, epochs, seed=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    out = []
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        out += list(loader)
    return out


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == xb.dtype == torch.float32 and ya.dtype == yb.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("augment", ["none", "crop", "crop_flip"])
@pytest.mark.parametrize("rank,world,micro", [(0, 1, 8), (0, 1, 4), (0, 2, 4), (1, 2, 4), (1, 2, 2)])
def test_on_device_gives_the_dataloader_batches_for_two_epochs(augment, rank, world, micro):
    """Every batch of 2 epochs, on one rank and on each of two: the same indices (the targets are the
    indices here), the same pixels, the same crops and flips, and the global random stream left in the
    same state (a DataLoader iterator draws from it when it is made)."""
    ds = _images()
    ds.augment = augment
    loader, device = _both_loaders(ds, 8, micro, rank, world)
    expected = _epochs(loader, (0, 1))
    state = torch.get_rng_state()
    got = _epochs(device, (0, 1))
    _assert_same_batches(expected, got)
    assert torch.equal(torch.get_rng_state(), state)
    s = GlobalBatchSampler(len(ds), 8, micro, rank, world, seed=5)
    assert [y.tolist() for _, y in got[: len(s)]] == list(s)  # epoch 0: the sampler's own batches
    if augment != "none":  # the crops did happen (the unaugmented pixels differ)
        assert not all(torch.equal(x, ds.images[y].float() / 255) for x, y in got)


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_on_device_resumes_mid_epoch_at_the_dataloader_batch(rank, world, augment):
    ds = _images()
    ds.augment = augment
    interrupted, _ = _both_loaders(ds, 8, 4, 0, world)
    interrupted.batch_sampler.set_epoch(1)
    list(itertools.islice(iter(interrupted), 3))
    state = interrupted.state_dict()
    assert state["batches"] == 3
    rests = []
    for resumed in _both_loaders(ds, 8, 4, rank, world):
        resumed.load_state_dict(state)
        rests.append(_epochs(resumed, (1, 2), seed=3))  # the rest of epoch 1, then epoch 2
    _assert_same_batches(*rests)
    full, _ = _both_loaders(ds, 8, 4, rank, world)
    full.batch_sampler.set_epoch(1)
    assert len(rests[0]) == len(full) - 3 + len(full)


def test_on_device_with_workers_draws_the_global_stream_as_persistent_workers_do():
    ds = _images()
    loader, device = _both_loaders(ds, 8, 4, 0, 1, workers=1)
    expected = _epochs(loader, (0, 1, 2))
    state = torch.get_rng_state()
    _assert_same_batches(expected, _epochs(device, (0, 1, 2)))
    assert torch.equal(torch.get_rng_state(), state)


class _Annotations:
    def __init__(self):
        self.fields = {}

    def annotate(self, **fields):
        self.fields.update(fields)


def _datamodule(on_device, trainer_device="cpu", **kwargs):
    dm = ImageDataModule("mnist5k", batch_size=500, eval_batch_size=300, on_device=on_device, **kwargs)
    record = _Annotations()
    dm.trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        current_epoch=1,
        strategy=SimpleNamespace(root_device=torch.device(trainer_device)),
        loggers=[record],
    )
    dm.setup("fit")
    return dm, record


def test_datamodule_on_device_true_false_give_the_same_train_and_eval_batches():
    on, on_record = _datamodule(True, train_eval_size=700)
    off, off_record = _datamodule(False, train_eval_size=700)
    assert (on.data_on_device, on_record.fields) == (True, {"data_on_device": True})
    assert (off.data_on_device, off_record.fields) == (False, {"data_on_device": False})
    assert isinstance(on.train_dataloader(), DeviceLoader)
    assert not isinstance(off.train_dataloader(), DeviceLoader)
    torch.manual_seed(0)
    expected = list(off.train_dataloader())
    torch.manual_seed(0)
    _assert_same_batches(expected, list(on.train_dataloader()))
    for a, b in zip(off.val_dataloader(), on.val_dataloader(), strict=True):
        assert isinstance(b, DeviceEvalLoader) and len(a) == len(b)
        _assert_same_batches(list(a), list(b))
    # the measurement callbacks' split is the placed one, unaugmented
    assert on.measurement_dataset("train").images is on.splits["train"].images


def test_on_device_auto_is_off_on_cpu_and_bad_values_are_refused():
    dm, record = _datamodule("auto")
    assert dm.data_on_device is False and record.fields == {"data_on_device": False}
    for bad in ("yes", 1, None, "True"):
        with pytest.raises(ConfigError, match=r"on_device=.* allowed: auto, true, false"):
            ImageDataModule("mnist5k", on_device=bad)
    with pytest.raises(ConfigError, match="num_workers=0"):
        ImageDataModule("mnist5k", on_device=True, augment="crop", num_workers=2)
