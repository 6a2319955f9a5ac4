"""Top-k Hessian eigenvalues: our Lanczos (measures.hessian) against PyHessian's power iteration and
curvlinops' ``HessianLinearOperator`` + scipy's ``eigsh`` (ARPACK), the two anchors.

Model: paper B's C1 network (two blocks conv5x5 -> ReLU -> BatchNorm -> maxpool(3, 2, pad 1),
then fc 384 -> fc 192 -> fc 10) in eval mode on random MNIST-shaped samples, or ResNet-20 on
random CIFAR-shaped samples (``--model resnet20``); fixed seeds.
For each k in (1, 5) and each data mode (one batch; a loader of several batches) it reports the
wall time of ours and of each anchor (alternating, same process), the ratios ours / theirs, the
number of Hessian-vector products and the largest relative error of the top-k against a
converged reference (our Lanczos to a relative residual of 1e-10 on a float64 copy,
cross-checked with scipy's eigsh on the same operator; errors below ~1e-7 are float32 rounding
of the products).
Ours runs at the default stop (estimated eigenvalue error <= 1e-4 of |λ_1|) and at a looser one
(1e-3). PyHessian mutates the model (``.eval()``, ``.grad``), so each of its runs gets a fresh copy;
its start vector is unseeded, so the global seed is set before each run. curvlinops runs with
``check_deterministic=False`` (its check costs extra products) and ``eigsh(which="LA")`` from a
seeded start vector, at ARPACK's tolerance 1e-3 (its stop: residual <= tol·|θ|, the loosest
setting at least as accurate as ours here) and at its default (machine precision).

    python benchmarks/hessian.py --quick     # 256 samples, 16 channels (~5-8 min on 2 cores)
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
EIGSH_TOLS = (1e-3, 0.0)  # curvlinops + eigsh: ARPACK's relative tolerance (0: machine precision)


def build_model(name: str, channels: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The benchmarked network (the project's own definitions) and its input shape."""
    if name == "c1":
        return models.c1((1, 28, 28), 10, channels=channels), (1, 28, 28)
    return models.resnet20((3, 32, 32), 10), (3, 32, 32)


def make_problem(
    name: str, channels: int, samples: int
) -> tuple[nn.Module, tuple[int, int, int], torch.Tensor, torch.Tensor, nn.Module]:
    """The benchmarked set-up, shared with ``benchmarks/operators.py``: the model (seed 0, eval
    mode), its input shape, ``samples`` random inputs and labels (seed 1), and the loss."""
    torch.manual_seed(0)
    base, shape = build_model(name, channels)
    base.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((samples, *shape), generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return base, shape, x, y, nn.CrossEntropyLoss()


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


def curvlinops_topk(
    model: nn.Module, loss_fn, batches, k: int, tol: float, operator: str = "HessianLinearOperator"
) -> tuple[torch.Tensor, int]:
    """A curvlinops operator (``HessianLinearOperator``, ``GGNLinearOperator``, ...) as a scipy
    operator, top-k by ``eigsh(which="LA")``, and its products (matrix-vector products scipy asked for)."""
    import curvlinops
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    cls = getattr(curvlinops, operator)
    mat = cls(model, loss_fn, params, list(batches), check_deterministic=False).to_scipy()
    calls = {"n": 0}

    def mv(v):
        calls["n"] += 1
        return mat @ v

    counted = LinearOperator(mat.shape, matvec=mv, dtype=mat.dtype)
    v0 = np.random.default_rng(0).standard_normal(mat.shape[0]).astype(mat.dtype)
    values = eigsh(counted, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return torch.tensor(sorted(values.tolist(), reverse=True), dtype=torch.float64), calls["n"]


def reference_top(model, loss_fn, batches, k: int) -> tuple[torch.Tensor, float]:
    """Converged top-k (Lanczos, relative residual 1e-10) and its gap to scipy's eigsh.

    Computed on a float64 copy of the model and data, so the reference is not limited by the
    ~1e-7 rounding of float32 products."""
    model = copy.deepcopy(model).double()
    batches = [(bx.double(), by) for bx, by in batches]
    op = HessianOperator(model, loss_fn, batches, cache=True)
    ref = lanczos_eigenvalues(op, k, tol=1e-10, stop="residual", max_iter=200, seed=123)
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


def compare(base, loss_fn, x, y, batches, loader, k: int, repeats: int) -> dict[str, list[tuple]]:
    """Per solver: [(seconds, top-k values, products)] over ``repeats`` alternating rounds."""
    runs: dict[str, list[tuple]] = {}
    solvers = {
        "ours": lambda: hessian_eigenvalues(copy.deepcopy(base), loss_fn, batches, k=k, seed=0, cache=True),
        "fast": lambda: hessian_eigenvalues(
            copy.deepcopy(base), loss_fn, batches, k=k, tol=FAST_TOL, seed=0, cache=True
        ),
        "pyh": lambda: pyhessian_topk(copy.deepcopy(base), loss_fn, x, y, k, loader, seed=0),
        **{
            f"curv{tol:g}": (lambda tol=tol: curvlinops_topk(copy.deepcopy(base), loss_fn, batches, k, tol))
            for tol in EIGSH_TOLS
        },
    }
    for _ in range(repeats):  # alternate, so drift in machine speed hits all of them
        for name, solve in solvers.items():
            t0 = time.perf_counter()
            out = solve()
            seconds = time.perf_counter() - t0
            values, n = (out.eigenvalues, out.n_hvp) if hasattr(out, "eigenvalues") else out
            runs.setdefault(name, []).append((seconds, values, n))
    return runs


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

    base, shape, x, y, loss_fn = make_problem(args.model, channels, samples)
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
    modes = [("1 batch", None, args.repeats), (f"loader {loader_batch}", loader, 1)]
    for mode, dl, repeats in modes:
        batches = [(x, y)] if dl is None else list(dl)
        for k in (1, 5):
            runs = compare(base, loss_fn, x, y, batches, dl, k, repeats)
            best = {name: min(r[0] for r in rs) for name, rs in runs.items()}
            result = {name: (rs[-1][1], rs[-1][2]) for name, rs in runs.items()}
            errors = {name: rel_error(values, ref) for name, (values, _) in result.items()}
            for name, label in (("ours", "default"), ("fast", f"{FAST_TOL:g}")):
                rows.append((mode, k, label, best, result, errors, name))
            print(f"  done: {mode}, top-{k}", flush=True)

    print()
    anchors = ["pyh", *[f"curv{tol:g}" for tol in EIGSH_TOLS]]
    names = {"pyh": "PyH", **{f"curv{tol:g}": f"cl{tol:g}" if tol else "cl-exact" for tol in EIGSH_TOLS}}
    header = f"{'data':<11}{'k':>2}{'our tol':>9}{'ours s':>8}{'HVP':>5}{'err':>9}"
    for a in anchors:
        header += f"{names[a] + ' s':>11}{'HVP':>5}{'err':>9}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for mode, k, label, best, result, errors, name in rows:
        line = f"{mode:<11}{k:>2}{label:>9}{best[name]:>8.2f}{result[name][1]:>5d}{errors[name]:>9.1e}"
        for a in anchors:
            line += f"{best[a]:>11.2f}{result[a][1]:>5d}{errors[a]:>9.1e}{best[name] / best[a]:>7.2f}"
        print(line)
    print(
        "s = wall time (min over repeats); HVP = Hessian-vector products; err = max relative error of the"
        " top-k vs the reference; ratio = our time / that anchor's time. Ours: Lanczos, cached graph,"
        f" stop on the estimated eigenvalue error <= tol·|λ_1|, tol = default ({DEFAULT_TOL:g}) or {FAST_TOL:g};"
        " PyH: PyHessian power iteration + deflation, maxIter=100, tol=1e-3 (its loader mode recomputes the"
        " forward pass per product); cl<tol>: curvlinops HessianLinearOperator + scipy eigsh(which='LA', tol)"
        " (recomputes forward and backward per product); cl-exact: eigsh's default tol (machine precision)."
    )


if __name__ == "__main__":
    main()
