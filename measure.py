"""Measure a saved checkpoint without retraining: Hessian spectrum, trace, density, attacks.

    python measure.py outputs/runs/default                       # last.ckpt, settings of the run
    python measure.py RUN_DIR --checkpoint best --subset 5000 --k 5 --float64 --trace --density
    python measure.py RUN_DIR --attacks --full-test --eps 0 0.05 0.1 0.2 0.3 --pgd-steps 40
    python measure.py RUN_DIR --operator ggn --blocks module --trace --trace-method hutchpp  # GGN per layer
    python measure.py RUN_DIR --no-hessian --attacks --final-attacks apgdce apgdt   # + AutoAttack's APGD

Uses the run's own resolved config (``results.json``) to rebuild the model and data, loads the
checkpoint's weights, and runs the same measurement code as the callbacks
(:class:`HessianSpectrum`, :class:`AdversarialAccuracy`), so the metric names match the
training records. A checkpoint gets the final measurement's attacks: the run's ``attacks`` and
``final_attacks`` (``--final-attacks``: others, none when given without names). Each result is named ``<checkpoint>[-<tag>]-<hash>``, the hash of the
effective settings (checkpoint, precision, Hessian and attack settings), so measurements with
different settings never replace each other, and the same settings replace their own earlier
result. Writes ``RUN_DIR/measurements/<name>.json`` and the same values under
``checkpoint_measurements[<name>]`` in ``results.json``; with ``--density`` also
``<name>_density.png`` and ``<name>_density.npz``, the eigenvalue density (stochastic Lanczos
quadrature); with ``--landscape 1d 2d`` the loss along the top Hessian eigenvectors and along
filter-normalized random directions on the Hessian's samples (:mod:`measures.landscape`), as
``<name>_landscape.npz`` and ``<name>_landscape_1d.png`` / ``_2d.png`` (see :mod:`reporting.landscape`).

Before measuring (which can take minutes), it checks that the run's record can be read, that the
run directory can be written, and takes the job's lock (``job.lock``, as ``train.py`` does): a run
that is training, or being measured by another ``measure.py``, is refused with exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from callbacks.adversarial_accuracy import AdversarialAccuracy
from callbacks.hessian_products import HVP_CHOICES
from callbacks.hessian_spectrum import TRACE_METHODS, HessianSpectrum
from callbacks.input_curvature import InputCurvature
from lifecycle.guards import JobRefused, job_lock
from lifecycle.record import RECORD, modify_record, plain
from lifecycle.saved_run import Refused, check_writable, find_checkpoint, load_model, read_run
from lightning_modules.data import ImageDataModule
from measures.batches import load_rank_subset, split_batches
from measures.curvature import OPERATORS
from measures.hessian import hessian_density
from measures.linalg import LanczosProgress
from measures.module_state import gradients_enabled, preserved_module_state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default="last", help="last | best | path to a .ckpt (default: last)")
    p.add_argument(
        "--subset", type=int, default=None, help="training samples for the Hessian (default: the run's)"
    )
    p.add_argument("--k", type=int, default=None, help="top-k eigenvalues (default: the run's)")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="Lanczos tolerance: each eigenvalue within tol * |lambda_1| (default: the run's)",
    )
    p.add_argument(
        "--stop",
        choices=("eigenvalue", "residual"),
        default=None,
        help="what tol applies to: the estimated eigenvalue error or the residual (default: the run's)",
    )
    p.add_argument(
        "--operator",
        choices=OPERATORS,
        default=None,
        help="curvature operator (logged under its name, e.g. ggn/lambda_1; default: the run's Hessian)",
    )
    p.add_argument("--blocks", nargs="+", default=None, help="per-layer curvature: module, or name patterns")
    p.add_argument("--trace-method", choices=TRACE_METHODS, default=None, help="hutchinson | hutchpp")
    p.add_argument(
        "--hvp", choices=HVP_CHOICES, default=None, help="Hessian-vector products (default: the run's)"
    )
    p.add_argument("--float64", action="store_true", help="measure in float64")
    p.add_argument("--trace", action="store_true", help="also the Hutchinson trace")
    p.add_argument("--density", action="store_true", help="also the eigenvalue density (SLQ) and its plot")
    p.add_argument("--density-steps", type=int, default=60, help="Lanczos steps (HVPs) of the density")
    p.add_argument("--no-hessian", action="store_true", help="skip the spectrum")
    p.add_argument(
        "--landscape",
        nargs="+",
        choices=("1d", "2d"),
        default=None,
        help="loss along the top Hessian eigenvector(s) and filter-normalized random directions: "
        "1d curves, 2d planes (top-2 eigenvectors; two random directions)",
    )
    p.add_argument("--landscape-points", type=int, default=21, help="grid points per axis (default 21)")
    p.add_argument(
        "--landscape-eigen-range",
        type=float,
        default=0.5,
        help="eigenvector coordinates in [-r, r] (default 0.5; unit: see --landscape-norm)",
    )
    p.add_argument(
        "--landscape-random-range",
        type=float,
        default=1.0,
        help="random-direction coordinates in [-r, r], 1 = each filter's norm (default 1)",
    )
    p.add_argument(
        "--landscape-norm",
        choices=("unit", "weights"),
        default="unit",
        help="eigenvectors of unit length, or of the weights' norm (default unit)",
    )
    p.add_argument("--attacks", action="store_true", help="also clean/robust accuracy on the test set")
    p.add_argument(
        "--full-test", action="store_true", help="attacks on the whole test set (default: the run's subset)"
    )
    p.add_argument("--eps", type=float, nargs="*", default=None, help="eps grid (default: the run's)")
    p.add_argument("--pgd-steps", type=int, default=None)
    p.add_argument(
        "--final-attacks",
        nargs="*",
        default=None,
        help="attacks beside the run's attacks, e.g. apgdce apgdt (AutoAttack's APGD; default: the run's "
        "final_attacks; no names: none)",
    )
    p.add_argument(
        "--apgd-steps", type=int, default=None, help="APGD iterations (default: the run's, or 100)"
    )
    p.add_argument(
        "--nested-eps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nested eps counting; --no-nested-eps: each eps on its own (default: the run's)",
    )
    p.add_argument(
        "--input-curvature",
        action="store_true",
        help="also the per-example input-Hessian eigenvalues at clean and PGD test points "
        "(the run's input_curvature settings, else the callback's defaults)",
    )
    p.add_argument("--tag", default="", help="a label in the result's name (<checkpoint>-<tag>-<hash>)")
    return p


def callback_settings(callbacks: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """The Hessian and attack callbacks' arguments: the run's own, with the command line's on top."""
    h = {k: v for k, v in callbacks.get("hessian", {}).items() if k != "_target_"}
    h.update(
        {
            k: v
            for k, v in (("subset_size", args.subset), ("k", args.k), ("tol", args.tol), ("stop", args.stop))
            if v is not None
        }
    )
    h["trace"] = args.trace or h.get("trace", False)
    h.update(curvature_settings(args))
    a = {k: v for k, v in callbacks.get("adversarial", {}).items() if k != "_target_"}
    a.setdefault("nested_eps", True)  # runs made before nested eps: what the callback now does
    given = (
        ("eps", args.eps),
        ("pgd_steps", args.pgd_steps),
        ("nested_eps", args.nested_eps),
        ("final_attacks", args.final_attacks),
        ("apgd_steps", args.apgd_steps),
    )
    a.update({k: v for k, v in given if v is not None})
    return h, a


def curvature_settings(args: argparse.Namespace) -> dict:
    """--operator (its own prefix), --blocks, --trace-method and --hvp as HessianSpectrum's arguments."""
    out = {}
    if args.operator not in (None, "hessian"):
        out.update(operator=args.operator, prefix=args.operator)
    if args.blocks:
        out["blocks"] = "module" if args.blocks == ["module"] else list(args.blocks)
    if args.trace_method:
        out["trace_method"] = args.trace_method
    if args.hvp:
        out["hvp"] = args.hvp
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        read_run(args.run_dir)
        check_writable(args.run_dir)
        with job_lock(args.run_dir, why=MEASURING):
            return measure(args)
    except (Refused, JobRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


MEASURING = (
    "a run that is training, or being measured, is not measured at the same time (its checkpoint and "
    "record change under the measurement). Wait for it to end, then measure again."
)


def measure(args: argparse.Namespace) -> int:
    """Measure the checkpoint and save the results (the caller holds the job's lock)."""
    run_dir = args.run_dir
    ckpt = find_checkpoint(run_dir, args.checkpoint)
    net, cfg, step = load_model(run_dir, ckpt, args.float64)
    h, a = callback_settings(OmegaConf.to_container(cfg.get("callbacks") or {}), args)
    ic = input_settings(cfg) if args.input_curvature else None
    settings = measurement_settings(run_dir, ckpt, step, args, h, a, ic)
    name = result_name(ckpt, settings, args.tag)
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "_target_"}
    dm = ImageDataModule(**data_cfg)
    dm.setup()
    dtype = next(net.parameters()).dtype
    results: dict[str, float] = {}
    print(f"[measure] {ckpt} ({'float64' if args.float64 else dtype}), result {name!r}")

    if not args.no_hessian:
        spectrum = HessianSpectrum(**h)
        ds = dm.measurement_dataset("train")
        x, y, idx = load_rank_subset(ds, spectrum.subset_size, spectrum.subset_seed, 0, 1)
        print(
            f"[measure] Hessian: top-{spectrum.k} on {len(x)} training samples (BatchNorm {spectrum.bn_mode}) ..."
        )
        with tqdm(total=spectrum.max_iter, desc="[measure] Lanczos", unit="HVP", leave=False) as bar:

            def progress(p: LanczosProgress) -> None:
                bar.update(1)
                bar.set_postfix_str(f"est. error {p.rel_error:.1e} of |λ_1| (stops at {p.tol:g})")

            loss = torch.nn.functional.cross_entropy
            results.update(spectrum.measure(net, loss, x.to(dtype), y, progress, idx=idx))
        print(
            "[measure] "
            + "  ".join(f"{k} {v:.6g}" for k, v in results.items() if "lambda" in k or "trace" in k)
        )
        if args.density:
            start = time.perf_counter()
            with gradients_enabled(), preserved_module_state(net, mode=spectrum.bn_mode):
                dens = hessian_density(
                    net,
                    torch.nn.functional.cross_entropy,
                    split_batches(
                        x.to(dtype),
                        y,
                        spectrum.batch_size_for(net, torch.nn.functional.cross_entropy, x.to(dtype), y),
                    ),
                    n_steps=args.density_steps,
                    hvp=spectrum.hvp_mode,
                )
            plot_density(dens, run_dir / "measurements" / f"{name}_density.png")
            save_density(run_dir / "measurements" / f"{name}_density.npz", dens, {"run": run_dir.name})
            results["hessian/density_n_hvp"] = float(dens.n_hvp)
            results["hessian/density_seconds"] = time.perf_counter() - start

    if args.landscape:
        results.update(measure_landscape(net, dm, h, args, run_dir, name, ckpt))

    if args.attacks:
        adv = AdversarialAccuracy(**a)
        adv.specs = adv.build_specs(dm.info.default_eps)
        adv.final_specs = adv.build_specs(dm.info.default_eps, final=True)
        size = None if args.full_test else adv.subset_size
        x, y, idx = load_rank_subset(dm.measurement_dataset("test"), size, adv.subset_seed, 0, 1)
        print(
            f"[measure] attacks: {', '.join(adv.attacks + adv.final_attacks)} at eps {sorted({s.eps for s in adv.specs})} on {len(x)} test samples ..."
        )
        with tqdm(desc="[measure] attacks", unit="attack-eps", leave=False) as bar:

            def progress(done: int, total: int | None, message: str) -> None:
                bar.total, bar.n = total, done
                bar.set_postfix_str(message)

            metrics = adv.measure(net, x.to(dtype), y, idx, progress=progress, final=True)
        full = f"{adv.prefix}_full/"
        results.update({full + k.split("/", 1)[1] if args.full_test else k: v for k, v in metrics.items()})
        print(
            "[measure] "
            + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("adv/") and "/eps" in k)
        )

    if args.input_curvature:
        results.update(measure_input_curvature(net, dm, ic, dtype))

    out = run_dir / "measurements" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    replaced = out.exists()
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run_dir"}
    result = {
        "checkpoint": str(ckpt),
        "settings": settings,
        "arguments": arguments,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "metrics": results,
    }
    out.write_text(json.dumps(result, indent=1))
    modify_record(
        run_dir / RECORD,
        lambda r: r.update(
            checkpoint_measurements={**(r.get("checkpoint_measurements") or {}), name: plain(result)}
        ),
    )
    again = " (replacing the earlier result of the same settings)" if replaced else ""
    print(f"[measure] wrote {out} and results.json:checkpoint_measurements[{name!r}]{again}")
    return 0


def input_settings(cfg) -> dict:
    """The input-curvature callback's arguments: the run's own if it had the callback, else defaults."""
    run = OmegaConf.to_container(cfg.get("callbacks") or {}).get("input_curvature") or {}
    return {k: v for k, v in run.items() if k != "_target_"}


def measure_input_curvature(net, dm, settings: dict, dtype) -> dict[str, float]:
    """Per-example input curvature of the checkpoint on the callback's fixed test subset."""
    ic = InputCurvature(**settings)
    x, y, idx = load_rank_subset(dm.measurement_dataset("test"), ic.subset_size, ic.subset_seed, 0, 1)
    print(f"[measure] input curvature: clean and PGD eps {ic.eps} on {len(x)} test samples ...")
    with tqdm(desc="[measure] input curvature", unit="set", leave=False) as bar:

        def progress(done: int, total: int, message: str) -> None:
            bar.total, bar.n = total, done
            bar.set_postfix_str(message)
            bar.refresh()

        metrics = ic.measure(net, x.to(dtype), y, idx, torch.arange(len(x)), len(x), progress=progress)
    print("[measure] " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("seconds")))
    return metrics


def measurement_settings(
    run_dir: Path,
    ckpt: Path,
    step: int | None,
    args: argparse.Namespace,
    hessian: dict,
    attacks: dict,
    input_curvature: dict | None = None,
) -> dict:
    """Everything that decides the measured values: which weights (checkpoint file and its training
    step), precision, and the effective Hessian and attack settings.

    Settings left at the run's own values and the same values given explicitly are the same
    settings; options that do not apply (``--trace`` with ``--no-hessian``) are left out.
    """
    path = ckpt.resolve()
    where = (
        path.relative_to(run_dir.resolve()).as_posix()
        if path.is_relative_to(run_dir.resolve())
        else str(path)
    )
    skip = {"every_n_epochs", "at_end", "full_test_at_end", "progress_every_s"}
    # Settings that do not apply are left out, so runs made before them keep their names.
    if not attacks.get("final_attacks"):
        skip.add("final_attacks")
    if not any(
        str(n).startswith("apgd") for n in [*attacks.get("attacks", []), *attacks.get("final_attacks", [])]
    ):
        skip |= {"apgd_steps", "apgd_target_classes"}
    return {
        "checkpoint": where,
        "checkpoint_step": step,
        "float64": args.float64,
        "hessian": None
        if args.no_hessian
        else {
            **{k: v for k, v in hessian.items() if k not in skip},
            "density_steps": args.density_steps if args.density else None,
        },
        "attacks": None
        if not args.attacks
        else {**{k: v for k, v in attacks.items() if k not in skip}, "full_test": args.full_test},
        # only when asked: results measured before these options keep their names
        **({"input_curvature": input_curvature} if input_curvature is not None else {}),
        **({"landscape": landscape_settings(args, hessian)} if args.landscape else {}),
    }


def _numbers_as_floats(value):
    if isinstance(value, bool) or not isinstance(value, int | float | list | tuple | dict):
        return value
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_numbers_as_floats(v) for v in value]
    return float(value)


def result_name(ckpt: Path, settings: dict, tag: str = "") -> str:
    """``<checkpoint>[-<tag>]-<hash of the settings>``: different settings never share a name."""
    digest = hashlib.sha1(json.dumps(_numbers_as_floats(settings), sort_keys=True).encode()).hexdigest()[:8]
    tag = re.sub(r"[^A-Za-z0-9._=+-]", "_", tag)
    return "-".join(part for part in (ckpt.stem, tag, digest) if part)


def plot_density(dens, path: Path) -> None:
    """Log density against eigenvalue, its Gaussian broadening stated (:func:`reporting.landscape.draw_density`)."""
    from reporting.landscape import draw_density

    draw_density(dens.nodes.numpy(), dens.weights.numpy(), path)
    print(f"[measure] density plot: {path}")


def save_density(path: Path, dens, meta: dict) -> None:
    """The SLQ nodes and weights, for the report's shared-axes densities."""
    from reporting.landscape import save_arrays

    save_arrays(path, {"nodes": dens.nodes.numpy(), "weights": dens.weights.numpy()}, meta)


def landscape_settings(args: argparse.Namespace, hessian: dict) -> dict:
    """What decides a landscape: dimensions, grid, ranges, normalization, and the Hessian's samples."""
    return {
        "dims": sorted(args.landscape),
        "points": args.landscape_points,
        "eigen_range": args.landscape_eigen_range,
        "random_range": args.landscape_random_range,
        "eigen_norm": args.landscape_norm,
        **{k: hessian.get(k) for k in ("subset_size", "subset_seed", "batch_size")},
    }


def measure_landscape(net, dm, h: dict, args, run_dir: Path, name: str, ckpt: Path) -> dict:
    """Loss along the top Hessian eigenvectors and along filter-normalized random directions (eval
    mode, on the Hessian's fixed training samples): arrays and PNGs under ``measurements/``."""
    from measures.landscape import eigen_directions, loss_landscape, random_directions
    from reporting.landscape import draw_run, save_arrays  # noqa: I001

    spectrum = HessianSpectrum(**h)
    dtype = next(net.parameters()).dtype
    x, y, _ = load_rank_subset(
        dm.measurement_dataset("train"), spectrum.subset_size, spectrum.subset_seed, 0, 1
    )
    loss_fn = torch.nn.functional.cross_entropy
    batches = split_batches(x.to(dtype), y, spectrum.batch_size_for(net, loss_fn, x.to(dtype), y))
    n = args.landscape_points
    k = 2 if "2d" in args.landscape else 1
    start = time.perf_counter()
    with tqdm(total=spectrum.max_iter, desc="[measure] landscape: Lanczos", unit="HVP", leave=False) as bar:
        eigen, lam = eigen_directions(
            net, loss_fn, batches, k, normalization=args.landscape_norm, tol=spectrum.tol,
            max_iter=spectrum.max_iter, progress=lambda p: bar.update(1),
        )  # fmt: skip
    rand = random_directions(net, k, seed=spectrum.subset_seed)
    grids = {"eigen": torch.linspace(-1, 1, n) * args.landscape_eigen_range}
    grids["random"] = torch.linspace(-1, 1, n) * args.landscape_random_range
    jobs = [(f"{kind}_{d}", kind, dirs if d == "2d" else dirs[:1]) for d in sorted(args.landscape)
            for kind, dirs in (("eigen", eigen), ("random", rand))]  # fmt: skip
    total = sum(n ** (2 if key.endswith("2d") else 1) for key, _, _ in jobs)
    arrays, done = {"eigenvalues": lam.numpy()}, 0
    print(
        f"[measure] landscape {' '.join(args.landscape)}: {total} points on {len(x)} training samples (eval mode) ..."
    )
    with tqdm(total=total, desc="[measure] landscape", unit="point", leave=False) as bar:
        for key, kind, dirs in jobs:
            land = loss_landscape(
                net, loss_fn, batches, dirs, [grids[kind]] * len(dirs), mode="eval",
                progress=lambda i, _: bar.update(1),
            )  # fmt: skip
            done += land.loss.numel()
            for j, c in enumerate(land.coords):
                arrays[f"{key}/coords{j}"] = c.numpy()
            arrays[f"{key}/loss"], arrays[f"{key}/accuracy"] = land.loss.numpy(), land.accuracy.numpy()
    meta = {
        "run": run_dir.name, "checkpoint": ckpt.name, "mode": "eval", "n_samples": len(x),
        "normalization": {"eigen": args.landscape_norm, "random": "filter"},
        "random_one_dim": "zero", "random_seed": spectrum.subset_seed,
    }  # fmt: skip
    prefix = run_dir / "measurements" / f"{name}_landscape"
    save_arrays(Path(f"{prefix}.npz"), arrays, meta)
    for png in draw_run(arrays, meta, prefix):
        print(f"[measure] landscape plot: {png}")
    seconds = time.perf_counter() - start
    at0 = {f"landscape/{key}_loss_max": float(arrays[f"{key}/loss"].max()) for key, _, _ in jobs}
    return {"landscape/points": float(done), "landscape/seconds": seconds, **at0}


if __name__ == "__main__":
    sys.exit(main())
