"""GGN top-5 and Hessian trace: ours (measures.curvature, measures.estimators) against curvlinops and
PyHessian, on the C1 bench's model and data (``benchmarks/hessian.py: make_problem``).

1. GGN top-5: ``curvature_operator("ggn", ...)`` + ``lanczos_eigenvalues(k=5)`` at the default
   eigenvalue stop (estimated error <= 1e-4·|λ_1|) against curvlinops 3.0.1
   ``GGNLinearOperator(model, loss, params, data, check_deterministic=False).to_scipy()`` +
   ``scipy.sparse.linalg.eigsh(k=5, which="LA")`` from a seeded start vector, at ARPACK's tol 1e-3
   and at its default (machine precision). Each one's largest relative error of the top-5 is taken
   against a reference: our Lanczos to a relative residual of 1e-10 on a float64 copy of the model
   and data, cross-checked by ``eigsh(tol=1e-10)`` on the same float64 operator wrapped as a scipy
   ``LinearOperator`` (the gap between the two is printed).
2. Hessian trace at equal standard error: ``hutchinson_trace`` and ``hutchpp_trace`` (sketch 10) on
   ``HessianOperator(cache=True)`` against PyHessian 0.1's ``hessian(...).trace()``. PyHessian's own
   stop is the relative change of the mean (no standard error), so it is driven one sample at a
   time (``trace(maxIter=1, tol=0)`` on one ``hessian`` object, whose graph is built once) under the
   same rule as ours: at least 10 samples, then stop once the standard error of the mean of its
   Hutchinson samples (std/sqrt(n)) is <= rtol·|estimate|. Ratios are given as timed (each to its
   stop) and normalised to exactly equal standard error: time·SE² (the cost of a Monte-Carlo
   estimate at a given SE scales as SE⁻²; the set-up cost, one forward and backward, is small).
   PyHessian writes ``.grad`` and calls ``.eval()``: each of its runs gets a fresh copy of the model
   (made outside the timed region, as for every solver here), so nothing it changes survives.

Every comparison alternates the solvers in each repeat and reports medians of the repeats; the
ratios are ours / theirs from the same run. Run from the repository root:

    PYTHONPATH=. python benchmarks/operators.py --samples 128 --channels 8 --threads 1   # a few minutes
    PYTHONPATH=. python benchmarks/operators.py            # the C1 bench's --quick size (256, 16 channels)
    PYTHONPATH=. python benchmarks/operators.py --tiny     # seconds: checks that it runs (the test)
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pyhessian import hessian
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine, hessian (the C1 bench)
from hessian import EIGSH_TOLS, curvlinops_topk, make_problem, rel_error  # noqa: E402
from machine import cpu_model  # noqa: E402

from measures.curvature import curvature_operator  # noqa: E402
from measures.estimators import hutchinson_trace, hutchpp_trace  # noqa: E402
from measures.hessian import HessianOperator  # noqa: E402
from measures.linalg import DEFAULT_TOL, lanczos_eigenvalues  # noqa: E402

K = 5
MIN_SAMPLES = 10
SKETCH = 10


# ---- 1. GGN top-k ------------------------------------------------------------------------------


def scipy_operator(op):
    """Our operator as a scipy ``LinearOperator`` (float64 vectors in and out)."""

    def mv(v):
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(-1)
        return op.matvec(t.to(op.dtype)).to(torch.float64).numpy()

    return LinearOperator((op.dim, op.dim), matvec=mv, dtype=np.float64)


def ggn_reference(model, loss_fn, x, y, k: int, max_iter: int) -> tuple[torch.Tensor, float]:
    """Converged top-k of the GGN (float64 copy; Lanczos to relative residual 1e-10) and its
    largest relative gap to ``eigsh(tol=1e-10)`` on the same operator."""
    model = copy.deepcopy(model).double()
    op = curvature_operator("ggn", model, loss_fn, [(x.double(), y)])
    ref = lanczos_eigenvalues(op, k, tol=1e-10, stop="residual", max_iter=max_iter, seed=123)
    v0 = np.random.default_rng(1).standard_normal(op.dim)
    other = np.sort(eigsh(scipy_operator(op), k=k, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False))
    gap = rel_error(torch.from_numpy(other[::-1].copy()), ref.eigenvalues)
    op.release()
    print(
        f"GGN reference: top-{k} = {[f'{v:.6g}' for v in ref.eigenvalues.tolist()]}, {ref.n_hvp} products,"
        f" converged={ref.converged}; max rel. gap to eigsh(tol=1e-10) = {gap:.1e}"
    )
    return ref.eigenvalues, gap


def ours_ggn(model, loss_fn, x, y, k: int) -> tuple[torch.Tensor, int]:
    op = curvature_operator("ggn", model, loss_fn, [(x, y)])
    res = lanczos_eigenvalues(op, k, seed=0)
    op.release()
    return res.eigenvalues, res.n_hvp


def curvlinops_ggn(model, loss_fn, x, y, k: int, tol: float) -> tuple[torch.Tensor, int]:
    """curvlinops' GGN as a scipy operator, top-k by ``eigsh(which="LA", tol)``, and its products."""
    return curvlinops_topk(model, loss_fn, [(x, y)], k, tol, operator="GGNLinearOperator")


# ---- 2. Hessian trace --------------------------------------------------------------------------


def ours_trace(model, loss_fn, x, y, method: str, rtol: float, max_samples: int, seed: int):
    """(estimate, standard error, products) of ours, stopped at SE <= rtol·|estimate|."""
    op = HessianOperator(model, loss_fn, [(x, y)], cache=True)
    estimator = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    extra = {} if method == "hutchinson" else {"sketch": SKETCH}
    res = estimator(op, rtol=rtol, min_samples=MIN_SAMPLES, max_samples=max_samples, seed=seed, **extra)
    op.release()
    return res.trace, res.stderr, res.n_hvp


def pyhessian_trace(model, loss_fn, x, y, rtol: float, max_samples: int, seed: int):
    """PyHessian's Hutchinson samples, one ``trace(maxIter=1)`` call each, until their standard
    error <= rtol·|mean| (after MIN_SAMPLES) or max_samples: (estimate, standard error, products)."""
    torch.manual_seed(seed)  # its Rademacher vectors come from the global generator
    h = hessian(model, loss_fn, data=(x, y), cuda=False)
    samples: list[float] = []
    while len(samples) < max_samples:
        samples += h.trace(maxIter=1, tol=0.0)
        n = len(samples)
        if n >= MIN_SAMPLES and np.std(samples, ddof=1) / np.sqrt(n) <= rtol * abs(np.mean(samples)):
            break
    n = len(samples)
    return float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(n)), n


# ---- running -----------------------------------------------------------------------------------


def alternate(base, solvers: dict, repeats: int) -> dict[str, list[tuple[float, tuple]]]:
    """Per solver, [(seconds, output)] over ``repeats`` rounds that alternate the solvers; each
    call gets a fresh copy of the model (copied outside the timing) and the repeat's index."""
    runs: dict[str, list[tuple[float, tuple]]] = {}
    for r in range(repeats):
        for name, solve in solvers.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            out = solve(model, r)
            runs.setdefault(name, []).append((time.perf_counter() - t0, out))
    return runs


def median_time(runs) -> float:
    return statistics.median(t for t, _ in runs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256, help="random MNIST-shaped samples (one batch)")
    parser.add_argument("--channels", type=int, default=16, help="C1's conv channels")
    parser.add_argument("--rtol", type=float, default=0.01, help="target standard error / |trace|")
    parser.add_argument(
        "--trace-samples", type=int, default=100, help="cap on the Hutchinson samples of a trace run"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", choices=("ggn", "trace"), default=None, help="leave one part out")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="32 samples, 4 channels, 20 trace samples, 1 repeat: seconds, for the test",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples, args.channels, args.rtol, args.repeats, args.trace_samples = 32, 4, 0.2, 1, 20
    if (
        min(args.samples, args.channels, args.repeats) < 1
        or args.trace_samples < MIN_SAMPLES
        or not args.rtol > 0
    ):
        parser.error(
            f"need --samples, --channels, --repeats >= 1, --trace-samples >= {MIN_SAMPLES}, --rtol > 0"
        )
    return args


def run_ggn(base, loss_fn, x, y, args) -> dict[str, float]:
    ref, gap = ggn_reference(base, loss_fn, x, y, K, max_iter=200)
    solvers = {"ours": lambda m, r: ours_ggn(m, loss_fn, x, y, K)}
    for tol in EIGSH_TOLS:
        solvers[f"cl{tol:g}"] = lambda m, r, tol=tol: curvlinops_ggn(m, loss_fn, x, y, K, tol)
    runs = alternate(base, solvers, args.repeats)
    t = {name: median_time(rs) for name, rs in runs.items()}
    print(f"\nGGN top-{K} (median of {args.repeats} alternating repeats)")
    print(f"{'solver':<34}{'time s':>8}{'products':>10}{'max rel err':>13}{'ours/it':>9}")
    ratios = {}
    labels = {"ours": f"ours: Lanczos, stop tol {DEFAULT_TOL:g}"}
    labels |= {
        f"cl{tol:g}": f"curvlinops + eigsh tol {tol:g}" if tol else "curvlinops + eigsh default tol"
        for tol in EIGSH_TOLS
    }
    for name, rs in runs.items():
        values, n = rs[-1][1]
        ratio = t["ours"] / t[name]
        if name != "ours":
            ratios[f"ggn_{name}"] = ratio
        print(f"{labels[name]:<34}{t[name]:>8.2f}{n:>10d}{rel_error(values, ref):>13.1e}{ratio:>9.2f}")
    print(f"(reference: our Lanczos, float64, residual 1e-10; gap to eigsh tol 1e-10: {gap:.1e})")
    return ratios


def run_trace(base, loss_fn, x, y, args) -> dict[str, float]:
    cap = args.trace_samples
    solvers = {
        "hutchinson": lambda m, r: ours_trace(m, loss_fn, x, y, "hutchinson", args.rtol, cap, r),
        "hutchpp": lambda m, r: ours_trace(m, loss_fn, x, y, "hutchpp", args.rtol, cap, r),
        "pyhessian": lambda m, r: pyhessian_trace(m, loss_fn, x, y, args.rtol, cap, r),
    }
    runs = alternate(base, solvers, args.repeats)
    t = {name: median_time(rs) for name, rs in runs.items()}
    se = {name: statistics.median(out[1] for _, out in rs) for name, rs in runs.items()}
    print(
        f"\nHessian trace, each run until SE <= {args.rtol:g}·|estimate| (min {MIN_SAMPLES}) or {cap} samples"
        f" (median of {args.repeats} alternating repeats, seeds 0..{args.repeats - 1})"
    )
    print(
        f"{'solver':<33}{'time s':>7}{'products':>9}{'estimate':>10}{'SE':>9}{'SE/|est|':>9}"
        f"{'n for target':>13}{'ours/PyH':>9}{'at equal SE':>12}"
    )
    labels = {
        "hutchinson": "ours: hutchinson_trace",
        "hutchpp": f"ours: hutchpp_trace (sketch {SKETCH})",
        "pyhessian": "PyHessian trace (Hutchinson)",
    }
    ratios = {}
    for name, rs in runs.items():
        est, err, _ = rs[-1][1]
        products = statistics.median(out[2] for _, out in rs)
        n_samples = products - (2 * SKETCH if name == "hutchpp" else 0)
        needed = math.ceil(n_samples * (err / (args.rtol * abs(est))) ** 2)  # samples for SE = target
        ratio = t[name] / t["pyhessian"]
        equal = ratio * se[name] ** 2 / se["pyhessian"] ** 2
        if name != "pyhessian":
            ratios[f"trace_{name}"], ratios[f"trace_{name}_equal_se"] = ratio, equal
        print(
            f"{labels[name]:<33}{t[name]:>7.2f}{products:>9g}{est:>10.4g}{err:>9.3g}{err / abs(est):>9.1%}"
            f"{needed:>13d}{ratio:>9.2f}{equal:>12.2f}"
        )
    print(
        "(estimate, SE, n for target: last repeat; time, products: medians. ours/PyH: time ratio, each to"
        " its stop; at equal SE: that ratio x (SE_ours / SE_PyH)^2 with median SEs, i.e. the time ratio to"
        " reach the same SE, as a Monte-Carlo run's cost scales as SE^-2. n for target: Hutchinson samples"
        " that SE = target needs, n x (SE / target)^2. Hutch++: SE is its Hutchinson part's, products"
        f" include its 2 x {SKETCH} sketch products.)"
    )
    return ratios


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, shape, x, y, loss_fn = make_problem("c1", args.channels, args.samples)
    dim = sum(p.numel() for p in base.parameters())
    print(
        f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s) of "
        f"{torch.multiprocessing.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"
    )
    print(
        f"model: C1 ({args.channels} channels), {dim} parameters, eval mode; {args.samples} random samples {shape}"
    )
    ratios = {}
    if args.skip != "ggn":
        ratios |= run_ggn(base, loss_fn, x, y, args)
    if args.skip != "trace":
        ratios |= run_trace(base, loss_fn, x, y, args)
    return ratios


if __name__ == "__main__":
    main()
