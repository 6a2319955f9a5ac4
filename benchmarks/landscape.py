"""A 2-D loss landscape against one epoch of training, in the same run.

Times :func:`measures.landscape.loss_landscape` on a 21x21 plane of two filter-normalized random
directions (441 points) for the default LeNet on 1,000 fixed training images of the embedded digits
(batches of 250, eval mode), and, in the same process, one epoch of plain SGD training of the same
LeNet on the 4,000 training images (batch 128, lr 0.01, momentum 0.9: forward, backward and step,
no Lightning). Also the top-2 eigenvectors (Lanczos) a plane along them needs. Prints the times,
their ratio and the machine.

    python benchmarks/landscape.py                # 21x21 on 1,000 images
    python benchmarks/landscape.py --points 11 --samples 500

Threads default to 1 (the 2-core machines here are shared: two threads ran slower).
Ratios come from one run on one machine; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import cpu_model  # noqa: E402  benchmarks/machine.py (scripts run from benchmarks/)

from lightning_modules import models  # noqa: E402
from lightning_modules.data import ImageDataModule  # noqa: E402
from measures.batches import fixed_subset_indices, load_items, split_batches  # noqa: E402
from measures.landscape import eigen_directions, loss_landscape, random_directions  # noqa: E402


def one_epoch(net, x, y, batch_size: int, seed: int = 0) -> float:
    """Seconds for one epoch of SGD on (x, y), shuffled."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    net.train()
    start = time.perf_counter()
    for s in range(0, len(x), batch_size):
        i = order[s : s + batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dm = ImageDataModule(name="mnist5k")
    dm.setup()
    train = dm.measurement_dataset("train")
    x_all, y_all = load_items(train, torch.arange(len(train)))
    x, y = load_items(train, fixed_subset_indices(len(train), args.samples, 0))
    torch.manual_seed(0)
    net = models.lenet(tuple(x.shape[1:]), 10)
    epoch_s = one_epoch(net, x_all, y_all, 128)  # also moves the weights off their initialization
    net.eval()
    batches = split_batches(x, y, 250)
    grid = [torch.linspace(-1, 1, args.points)] * 2
    start = time.perf_counter()
    land = loss_landscape(net, F.cross_entropy, batches, random_directions(net, 2, seed=0), grid)
    land_s = time.perf_counter() - start
    start = time.perf_counter()
    eigen_directions(net, F.cross_entropy, batches, 2)
    eig_s = time.perf_counter() - start
    epoch2_s = one_epoch(net, x_all, y_all, 128, seed=1)  # again, after: load may have changed
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"one training epoch (LeNet, {len(x_all)} images, batch 128): {epoch_s:.2f} s before, {epoch2_s:.2f} s after"
    )
    print(
        f"2-D landscape {args.points}x{args.points} = {land.loss.numel()} points on {len(x)} images: "
        f"{land_s:.2f} s ({land_s / land.loss.numel() * 1e3:.1f} ms/point), "
        f"{land_s / ((epoch_s + epoch2_s) / 2):.1f} epochs"
    )
    print(f"top-2 Hessian eigenvectors (Lanczos) on the same images: {eig_s:.2f} s")
    print(f"loss range on the plane: {float(land.loss.min()):.3g} .. {float(land.loss.max()):.3g}")


if __name__ == "__main__":
    main()
