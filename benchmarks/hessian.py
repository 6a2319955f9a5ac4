"""Top-k Hessian eigenvalues: our Lanczos (measures.hessian) against PyHessian's power iteration.

Model: paper B's C1 network (two blocks conv5x5 -> ReLU -> BatchNorm -> maxpool(3, 2, pad 1),
then fc 384 -> fc 192 -> fc 10) in eval mode on random MNIST-shaped samples, or ResNet-20 on
random CIFAR-shaped samples (``--model resnet20``); fixed seeds.
For each k in (1, 5) and each data mode (one batch; a loader of several batches) it reports the
wall time of ours and of PyHessian (alternating, same process), their ratio, the number of
Hessian-vector products and the largest relative error of the top-k against a converged
reference (our Lanczos to a relative residual of 1e-10 on a float64 copy, cross-checked with
scipy's eigsh on the same operator; errors below ~1e-7 are float32 rounding of the products).
Ours runs at the default tolerance and at a looser one (1e-3). PyHessian mutates the model
(``.eval()``, ``.grad``), so each of its runs gets a fresh copy; its start vector is unseeded,
so the global seed is set before each run.

    python benchmarks/hessian.py --quick     # 256 samples, 16 channels (~3-5 min on 2 cores)
    python benchmarks/hessian.py             # 1024 samples, 64 channels (long on a CPU)
    python benchmarks/hessian.py --quick --model resnet20   # ResNet-20, 64 CIFAR-shaped samples

Threads default to 1: on the 2-core VMs two OpenMP threads made each product 2-6x slower.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)
from torch import nn

from lightning_modules import models
from measures.hessian import HessianOperator, hessian_eigenvalues
from measures.linalg import DEFAULT_TOL, lanczos_eigenvalues

FAST_TOL = 1e-3  # a looser Lanczos stop, still far more accurate than PyHessian's default


def build_model(name: str, channels: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The benchmarked network (the project's own definitions) and its input shape."""
    if name == "c1":
        return models.c1((1, 28, 28), 10, channels=channels), (1, 28, 28)
    return models.resnet20((3, 32, 32), 10), (3, 32, 32)


def pyhessian_topk(model: nn.Module, loss_fn, x, y, k: int, loader, seed: int) -> tuple[torch.Tensor, int]:
    """PyHessian's top-k (power iteration + deflation, defaults maxIter=100, tol=1e-3) and its HVPs."""
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the package re-exports the class under this name

    counter = {"n": 0}
    single = ph.hessian_vector_product
    on_loader = ph.hessian.dataloader_hv_product

    def counted_single(*args, **kwargs):
        counter["n"] += 1
        return single(*args, **kwargs)

    def counted_loader(self, v):
        counter["n"] += 1
        return on_loader(self, v)

    ph.hessian_vector_product = counted_single
    ph.hessian.dataloader_hv_product = counted_loader
    try:
        torch.manual_seed(seed)
        if loader is None:
            h = ph.hessian(model, loss_fn, data=(x, y), cuda=False)
        else:
            h = ph.hessian(model, loss_fn, dataloader=loader, cuda=False)
        values, _ = h.eigenvalues(top_n=k)
    finally:
        ph.hessian_vector_product = single
        ph.hessian.dataloader_hv_product = on_loader
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64), counter["n"]


def reference_top(model, loss_fn, batches, k: int) -> tuple[torch.Tensor, float]:
    """Converged top-k (Lanczos, relative residual 1e-10) and its gap to scipy's eigsh.

    Computed on a float64 copy of the model and data, so the reference is not limited by the
    ~1e-7 rounding of float32 products."""
    model = copy.deepcopy(model).double()
    batches = [(bx.double(), by) for bx, by in batches]
    op = HessianOperator(model, loss_fn, batches, cache=True)
    ref = lanczos_eigenvalues(op, k, tol=1e-10, max_iter=200, seed=123)
    gap = float("nan")
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        def mv(v):
            return op.matvec(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(-1)).numpy()

        lin = LinearOperator((op.dim, op.dim), matvec=mv, dtype=np.float64)
        scipy_top = np.sort(eigsh(lin, k=k, which="LA", tol=1e-10, return_eigenvectors=False))[::-1]
        gap = float(
            (torch.from_numpy(scipy_top.copy()) - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max()
        )
    except ImportError:
        pass
    op.release()
    print(
        f"reference: top-{k} = {[f'{v:.6g}' for v in ref.eigenvalues.tolist()]}, {ref.n_hvp} HVPs, "
        f"converged={ref.converged}, max rel. gap to scipy eigsh = {gap:.1e}"
    )
    return ref.eigenvalues, gap


def rel_error(values: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((values - ref[: len(values)]) / ref[: len(values)]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 samples (resnet20: 64), 16 channels")
    parser.add_argument(
        "--model",
        choices=("c1", "resnet20"),
        default="c1",
        help="C1 on MNIST-shaped or ResNet-20 on CIFAR-shaped data",
    )
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--loader-batch", type=int, default=None, help="batch size of the loader mode")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats (single-batch mode)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    samples = args.samples or ((64 if args.model == "resnet20" else 256) if args.quick else 1024)
    channels = args.channels or (16 if args.quick else 64)
    loader_batch = args.loader_batch or samples // 4
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base, shape = build_model(args.model, channels)
    base.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((samples, *shape), generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=loader_batch)
    dim = sum(p.numel() for p in base.parameters())
    print(
        f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s) of "
        f"{torch.multiprocessing.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"model: {args.model} ({channels} channels in C1), {dim} parameters, eval mode; "
        f"{samples} random samples of shape {shape}"
    )

    ref, _ = reference_top(base, loss_fn, [(x, y)], 5)

    rows = []
    last: dict[str, object] = {}
    modes = [("1 batch", None, args.repeats), (f"loader {loader_batch}", loader, 1)]
    for mode, dl, repeats in modes:
        batches = [(x, y)] if dl is None else dl
        for k in (1, 5):
            times: dict[str, list[float]] = {"ours": [], "fast": [], "pyh": []}
            for _ in range(repeats):  # alternate, so drift in machine speed hits all three
                for name, tol in (("ours", None), ("fast", FAST_TOL)):
                    model = copy.deepcopy(base)
                    t0 = time.perf_counter()
                    res = hessian_eigenvalues(model, loss_fn, batches, k=k, tol=tol, seed=0, cache=True)
                    times[name].append(time.perf_counter() - t0)
                    last[name] = res
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                theirs, theirs_hvp = pyhessian_topk(model, loss_fn, x, y, k, dl, seed=0)
                times["pyh"].append(time.perf_counter() - t0)
            tp, et = min(times["pyh"]), rel_error(theirs, ref)
            for name, label in (("ours", "default"), ("fast", f"{FAST_TOL:g}")):
                res = last[name]
                eo = rel_error(res.eigenvalues, ref)
                rows.append((mode, k, label, min(times[name]), tp, res.n_hvp, theirs_hvp, eo, et))
            print(f"  done: {mode}, top-{k}", flush=True)

    print()
    header = (
        f"{'data':<11}{'k':>2}{'our tol':>9}{'ours s':>8}{'PyH s':>8}{'ratio':>7}{'our HVP':>8}{'PyH HVP':>8}"
        f"{'our err':>9}{'PyH err':>9}{'err ratio':>10}"
    )
    print(header)
    print("-" * len(header))
    for mode, k, label, to, tt, ho, ht, eo, et in rows:
        print(
            f"{mode:<11}{k:>2}{label:>9}{to:>8.2f}{tt:>8.2f}{to / tt:>7.2f}{ho:>8d}{ht:>8d}"
            f"{eo:>9.1e}{et:>9.1e}{et / max(eo, 1e-16):>10.1e}"
        )
    print(
        "ratio = ours/PyHessian wall time (min over repeats); err = max relative error of the top-k vs the"
        f" reference; err ratio = PyHessian err / our err. Ours: Lanczos, cached graph, tol = default"
        f" ({DEFAULT_TOL:g}) or {FAST_TOL:g} (relative residual); PyHessian: power iteration + deflation,"
        " maxIter=100, tol=1e-3 (its loader mode recomputes the forward pass per product)."
    )


if __name__ == "__main__":
    main()
