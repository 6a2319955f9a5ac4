"""Lightning overhead: one training epoch of the default model/data, our Trainer vs a plain loop.

Both do the same work: LeNet (or ``--model``) on the 4,000 embedded training digits, global batch 128, SGD
(lr 0.01, momentum 0.9), the same GlobalBatchSampler batches, no validation, no logging to
disk. Repeats alternate between the two so machine noise hits both; the median ratio is the
result (goal: our time / plain time <= 1.10).

    python benchmarks/lightning_overhead.py [--repeats 5] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)
from torch.utils.data import DataLoader

from lightning_modules import models
from lightning_modules.data import GlobalBatchSampler, ImageDataModule
from lightning_modules.module import SGDClassifier, SGDConfig


def make_loader(dm: ImageDataModule, batch: int) -> DataLoader:
    sampler = GlobalBatchSampler(len(dm.splits["train"]), batch, batch, 0, 1, seed=0)
    return DataLoader(dm.splits["train"], batch_sampler=sampler)


def make_net(name: str):
    torch.manual_seed(0)
    return getattr(models, name)((1, 28, 28), 10, mean=[0.1307], std=[0.3081])


def plain_epochs(dm, batch, epochs, model) -> float:
    net = make_net(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = make_loader(dm, batch)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        net.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def lightning_epochs(dm, batch, epochs, model) -> float:
    net = make_net(model)
    module = SGDClassifier(net, SGDConfig(batch_size=batch, lr=0.01, momentum=0.9))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    loader = make_loader(dm, batch)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="lenet", help="lenet (the default run's) | c1 | mlp | resnet20")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dm = ImageDataModule("mnist5k")
    dm.setup()
    lightning_epochs(dm, args.batch, 1, args.model)  # warm-up: imports, first-call costs
    plain_epochs(dm, args.batch, 1, args.model)
    ours, plain = [], []
    for _ in range(args.repeats):
        ours.append(lightning_epochs(dm, args.batch, args.epochs, args.model))
        plain.append(plain_epochs(dm, args.batch, args.epochs, args.model))
    ratios = [o / p for o, p in zip(ours, plain, strict=True)]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), pytorch_lightning {pl.__version__}"
    )
    print(
        f"work: {args.model}, 4000 embedded digits, batch {args.batch}, {args.epochs} epoch(s), {args.repeats} repeats"
    )
    print(f"plain loop    median {statistics.median(plain):.3f} s")
    print(f"our Trainer   median {statistics.median(ours):.3f} s")
    print(
        f"ratio ours/plain: median {statistics.median(ratios):.3f} (each: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
