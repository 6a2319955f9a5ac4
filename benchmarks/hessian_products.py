"""Hessian-vector products one at a time vs several per batched second backward, per device.

Times :meth:`measures.hessian.HessianOperator.matvec` (one vector per second backward through the
cached graph) against :meth:`~measures.hessian.HessianOperator.matmat` (``b`` vectors in one
backward, ``is_grads_batched=True``) and, for reference, torch.func forward-over-reverse
(``jvp`` of ``grad``, one vector, and ``vmap`` over ``b``: what curvlinops does), on the default
LeNet (or C1) with random digits-shaped inputs. Prints seconds per vector and the ratio to the
single-vector path: below 1 means the batched path is faster on this device.

    python benchmarks/hessian_products.py                       # CPU, 1 thread, 1000 samples
    python benchmarks/hessian_products.py --device cuda         # a GPU (not measured here)

The solvers pick by these numbers: Lanczos is single-vector (one product per step); Hutchinson's
blocks go through ``matmat``.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_modules import models
from measures.hessian import HessianOperator


def best_time(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("lenet", "c1"), default="lenet")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = (
        (models.lenet((1, 28, 28), 10) if args.model == "lenet" else models.c1((1, 28, 28), 10))
        .to(device)
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    x = torch.rand((args.samples, 1, 28, 28), generator=g).to(device)
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(net, loss_fn, [(x, y)], cache=True)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_model()}, {args.threads} thread(s)"
    )
    print(
        f"device: {where}; {args.model}, {op.dim} parameters, {args.samples} samples, torch {torch.__version__}"
    )

    params = {n: p.detach() for n, p in net.named_parameters()}
    names = list(params)
    gradient = grad(lambda p: loss_fn(functional_call(net, p, (x,)), y))

    def func_hvp(v: torch.Tensor) -> torch.Tensor:
        tangent, offset = {}, 0
        for n in names:
            tangent[n] = v[offset : offset + params[n].numel()].view_as(params[n]).to(params[n].dtype)
            offset += params[n].numel()
        _, out = jvp(gradient, (params,), (tangent,))
        return torch.cat([out[n].reshape(-1) for n in names])

    vs = torch.randn(
        op.dim, max(args.blocks), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    ).to(device)
    single = best_time(lambda: op.matvec(vs[:, 0]), args.repeats, device)
    fr = best_time(lambda: func_hvp(vs[:, 0].float()), args.repeats, device)
    check = float((op.matmat(vs[:, :2])[:, 1] - op.matvec(vs[:, 1])).norm() / op.matvec(vs[:, 1]).norm())
    print(f"single vector, cached double backward: {single * 1e3:.1f} ms / vector (1.00)")
    print(f"single vector, torch.func jvp(grad):   {fr * 1e3:.1f} ms / vector ({fr / single:.2f})")
    for b in args.blocks:
        batched = best_time(lambda b=b: op.matmat(vs[:, :b]), args.repeats, device) / b
        mapped = best_time(lambda b=b: vmap(func_hvp)(vs[:, :b].T.float()), args.repeats, device) / b
        print(
            f"block of {b}: batched backward {batched * 1e3:.1f} ms / vector ({batched / single:.2f}), "
            f"vmap jvp(grad) {mapped * 1e3:.1f} ms / vector ({mapped / single:.2f})"
        )
    print(f"(batched vs single products agree to {check:.1e}; ratios in parentheses: / single-vector time)")


if __name__ == "__main__":
    main()
