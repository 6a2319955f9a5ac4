"""Per-example input curvature: the batched measurement against a per-example loop.

Times :func:`measures.input_curvature.input_curvature` (one double-backward pass gives every
example's own input-Hessian product; the Lanczos recurrences of all examples run side by side)
against the obvious hand-written way: for each example alone, ``torch.autograd.functional.hvp`` of
its loss for every product, under the same Lanczos (:func:`measures.input_curvature.batched_lanczos`
with one example, same tolerance and start vectors), on the same test images of the default LeNet.
Prints both times, their ratio, and the largest difference between the two results' eigenvalues
(relative to λ_max), with the machine.

    python benchmarks/input_curvature.py --checkpoint outputs/runs/default/checkpoints/last.ckpt
    python benchmarks/input_curvature.py --activation softplus     # an untrained softplus LeNet

Without ``--checkpoint`` the LeNet is untrained (seed 0): its curvature is small, but the work
per product is the same.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

from lightning_modules import models
from lightning_modules.data import ImageDataModule
from measures.batches import fixed_subset_indices, load_items
from measures.input_curvature import batched_lanczos, input_curvature


def per_example_loop(model, x, y, index, k, tol, max_iter, seed):
    """Each example alone: its loss's input Hessian products by ``torch.autograd.functional.hvp``."""
    top, low = [], []
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]

        def loss(inp, yi=yi):
            return F.cross_entropy(model(inp), yi)

        def matvec(v, xi=xi, loss=loss):
            return torch.autograd.functional.hvp(loss, xi, v.view_as(xi))[1].reshape(1, -1)

        eig = batched_lanczos(
            matvec, index[i : i + 1], xi[0].numel(), k=k, smallest=1, tol=tol, max_iter=max_iter, seed=seed,
            dtype=xi.dtype,
        )  # fmt: skip
        top.append(eig.eigenvalues[0])
        low.append(eig.smallest[0, 0])
    return torch.stack(top), torch.stack(low)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="a run's checkpoint (its LeNet weights)")
    parser.add_argument("--activation", default="relu", choices=sorted(models.ACTIVATIONS))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--float32", action="store_true", help="products in float32 (default: float64, as the callback)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = ImageDataModule(name="mnist5k", download=False)
    dm.setup("fit")
    info = dm.info
    torch.manual_seed(0)
    net = models.lenet(
        info.input_shape, info.num_classes, activation=args.activation, mean=info.mean, std=info.std
    )
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    net.eval()
    if not args.float32:
        net = net.double()
    dataset = dm.measurement_dataset("test")
    index = fixed_subset_indices(len(dataset), args.samples, 0)
    x, y = load_items(dataset, index)
    x = x.to(next(net.parameters()).dtype)

    t0 = time.perf_counter()
    batched = input_curvature(net, x, y, index, k=args.k, trace=False, tol=args.tol)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    top, low = per_example_loop(net, x, y, index, args.k, args.tol, 100, 0)
    t_loop = time.perf_counter() - t0

    scale = batched.top[:, 0].abs().clamp_min(1e-30)
    diff = max(
        float(((batched.top - top).abs().amax(1) / scale).max()),
        float(((batched.smallest - low).abs() / scale).max()),
    )
    print(f"machine: {cpu_model()}, {args.threads} thread(s); LeNet ({args.activation}"
          f"{', ' + args.checkpoint if args.checkpoint else ', untrained'}), {args.samples} test digits, "
          f"top-{args.k} and lambda_min, tol {args.tol:g}, {'float32' if args.float32 else 'float64'}")  # fmt: skip
    print(f"batched (ours):            {t_batched:8.2f} s   ({batched.n_products} batched products, "
          f"{int(batched.converged.sum())}/{len(x)} converged)")  # fmt: skip
    print(f"per-example loop (hvp):    {t_loop:8.2f} s")
    print(f"speed-up: loop / batched = {t_loop / t_batched:.1f}x; largest eigenvalue difference "
          f"{diff:.2e} of lambda_max")  # fmt: skip


if __name__ == "__main__":
    main()
