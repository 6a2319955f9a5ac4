"""One Hessian-vector product's cost in gradients, per shipped model and per way of computing it.

For each model (random inputs of its usual data's shape, BatchNorm in eval mode) it times, in the
same run: one gradient (forward + backward of the mean loss over all samples: the unit), one product
by cached double backward (:class:`measures.hessian.HessianOperator`, ``hvp="double_backward"``:
one second backward through the kept graph), one by forward-over-reverse (``hvp=
"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``), and, per vector of a block of
``--block``: each mode's ``matmat`` (a batched second backward; ``torch.func.vmap`` over the tangents)
against ``--block`` lone forward-over-reverse products. It prints each as milliseconds and as
gradients (its time / the gradient's), and what ``hvp: auto`` would choose
(:func:`measures.hessian.fastest_hvp`), with the machine.

    python benchmarks/hessian_products.py                              # CPU, 1 thread, 256 samples
    python benchmarks/hessian_products.py --device cuda --samples 1024 # a GPU
    python benchmarks/hessian_products.py --models lenet c1 --samples 64 --repeats 1
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)
from torch import nn

from lightning_modules import models
from measures.hessian import HessianOperator, fastest_hvp

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
MODELS = {
    "lenet": (models.lenet, MNIST),
    "mlp": (models.mlp, MNIST),
    "c1": (models.c1, CIFAR),
    "resnet20": (models.resnet20, CIFAR),
}


def best_time(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up (lazy initialization, cuDNN's choice)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_model(name: str, args, device: torch.device) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    net = build(shape, 10).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((args.samples, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in net.parameters() if p.requires_grad]
    ops = {
        mode: HessianOperator(net, loss_fn, [(x, y)], cache=True, hvp=mode)
        for mode in ("double_backward", "forward_over_reverse")
    }
    dim = ops["double_backward"].dim
    vs = torch.randn(dim, args.block, generator=torch.Generator().manual_seed(2)).to(device)
    t = {"gradient": best_time(lambda: torch.autograd.grad(loss_fn(net(x), y), params), args.repeats, device)}
    for mode, op in ops.items():
        t[mode] = best_time(lambda op=op: op.matvec(vs[:, 0]), args.repeats, device)
        t[f"{mode} block"] = best_time(lambda op=op: op.matmat(vs), args.repeats, device) / args.block
    fr = ops["forward_over_reverse"]
    t["lone"] = best_time(lambda: [fr.matvec(v) for v in vs.T], args.repeats, device) / args.block
    ref = ops["double_backward"].matmat(vs)
    agree = float((fr.matmat(vs) - ref).norm() / ref.norm())
    for op in ops.values():
        op.release()
    choice = fastest_hvp(net, loss_fn, [(x, y)])

    def cost(key: str) -> str:
        return f"{t[key] * 1e3:.1f} ms = {t[key] / t['gradient']:.2f} gradients"

    print(
        f"{name}: {dim} parameters, {args.samples} samples {tuple(shape)}; one gradient {t['gradient'] * 1e3:.1f} ms\n"
        f"  one product   double backward (cached) {cost('double_backward')} | "
        f"forward-over-reverse {cost('forward_over_reverse')}\n"
        f"  per vector of a block of {args.block}: batched second backward {cost('double_backward block')} | "
        f"forward-over-reverse vmap {cost('forward_over_reverse block')} | {args.block} lone forward-over-reverse {cost('lone')}\n"
        f"  hvp: auto chooses {choice.mode} (timed " + ", ".join(f"{m} {ms:.1f} ms" for m, ms in choice.ms.items()) + f"); "
        f"the modes agree to {agree:.1e}"
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_model()}, {args.threads} thread(s)"
    )
    print(
        f"device: {where}; torch {torch.__version__}; float32, BatchNorm in eval mode; best of {args.repeats}"
    )
    for name in args.models:
        measure_model(name, args, device)


if __name__ == "__main__":
    main()
