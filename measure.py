"""Measure a saved checkpoint without retraining: Hessian spectrum, trace, density, attacks.

    python measure.py outputs/runs/default                       # last.ckpt, settings of the run
    python measure.py RUN_DIR --checkpoint best --subset 5000 --k 5 --float64 --trace --density
    python measure.py RUN_DIR --attacks --full-test --eps 0 0.05 0.1 0.2 0.3 --pgd-steps 40

Uses the run's own resolved config (``results.json``) to rebuild the model and data, loads the
checkpoint's weights, and runs the same measurement code as the callbacks
(:class:`HessianSpectrum`, :class:`AdversarialAccuracy`), so the metric names match the
training records. Writes ``RUN_DIR/measurements/<checkpoint>[_<tag>].json`` and adds the same
values under ``checkpoint_measurements`` in ``results.json``; with ``--density`` also a PNG of
the eigenvalue density (stochastic Lanczos quadrature).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from callbacks.adversarial_accuracy import AdversarialAccuracy
from callbacks.hessian_spectrum import HessianSpectrum
from lifecycle.build import build_model
from lifecycle.record import RECORD, read_record, update_record
from lightning_modules.data import ImageDataModule
from measures.batches import load_rank_subset, split_batches
from measures.hessian import hessian_density
from measures.module_state import gradients_enabled, preserved_module_state


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if which == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
    elif which == "best":
        found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
        path = found[-1] if found else run_dir / "checkpoints" / "best-missing.ckpt"
    else:
        path = Path(which)
    if not path.exists():
        raise SystemExit(f"error: no checkpoint {path} (--checkpoint last | best | a path)")
    return path


def load_model(run_dir: Path, checkpoint: Path, float64: bool):
    """The run's network with the checkpoint's weights, plus its resolved config."""
    record = read_record(run_dir / RECORD)
    if "config" not in record:
        raise SystemExit(f"error: {run_dir}/{RECORD} has no config: is this a run directory of train.py?")
    cfg = OmegaConf.create(record["config"])
    net = build_model(cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return (net.double() if float64 else net), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default="last", help="last | best | path to a .ckpt (default: last)")
    p.add_argument(
        "--subset", type=int, default=None, help="training samples for the Hessian (default: the run's)"
    )
    p.add_argument("--k", type=int, default=None, help="top-k eigenvalues (default: the run's)")
    p.add_argument("--tol", type=float, default=None, help="Lanczos relative residual tolerance")
    p.add_argument("--float64", action="store_true", help="measure in float64")
    p.add_argument("--trace", action="store_true", help="also the Hutchinson trace")
    p.add_argument("--density", action="store_true", help="also the eigenvalue density (SLQ) and its plot")
    p.add_argument("--density-steps", type=int, default=60, help="Lanczos steps (HVPs) of the density")
    p.add_argument("--no-hessian", action="store_true", help="skip the spectrum")
    p.add_argument("--attacks", action="store_true", help="also clean/robust accuracy on the test set")
    p.add_argument(
        "--full-test", action="store_true", help="attacks on the whole test set (default: the run's subset)"
    )
    p.add_argument("--eps", type=float, nargs="*", default=None, help="eps grid (default: the run's)")
    p.add_argument("--pgd-steps", type=int, default=None)
    p.add_argument("--tag", default="", help="suffix of the output file name")
    args = p.parse_args(argv)

    run_dir = args.run_dir
    ckpt = find_checkpoint(run_dir, args.checkpoint)
    net, cfg = load_model(run_dir, ckpt, args.float64)
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "_target_"}
    dm = ImageDataModule(**data_cfg)
    dm.setup()
    dtype = next(net.parameters()).dtype
    results: dict[str, float] = {}
    callbacks = OmegaConf.to_container(cfg.get("callbacks") or {})
    print(f"[measure] {ckpt} ({'float64' if args.float64 else dtype})")

    if not args.no_hessian:
        h = {k: v for k, v in callbacks.get("hessian", {}).items() if k != "_target_"}
        h.update(
            {
                k: v
                for k, v in (("subset_size", args.subset), ("k", args.k), ("tol", args.tol))
                if v is not None
            }
        )
        h["trace"] = args.trace or h.get("trace", False)
        spectrum = HessianSpectrum(**h)
        ds = dm.measurement_dataset("train")
        x, y, _ = load_rank_subset(ds, spectrum.subset_size, spectrum.subset_seed, 0, 1)
        print(
            f"[measure] Hessian: top-{spectrum.k} on {len(x)} training samples (BatchNorm {spectrum.bn_mode}) ..."
        )
        results.update(spectrum.measure(net, torch.nn.functional.cross_entropy, x.to(dtype), y))
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
                    split_batches(x.to(dtype), y, spectrum.batch_size),
                    n_steps=args.density_steps,
                )
            plot_density(
                dens,
                run_dir / "measurements" / f"{ckpt.stem}{'_' + args.tag if args.tag else ''}_density.png",
            )
            results["hessian/density_n_hvp"] = float(dens.n_hvp)
            results["hessian/density_seconds"] = time.perf_counter() - start

    if args.attacks:
        a = {k: v for k, v in callbacks.get("adversarial", {}).items() if k != "_target_"}
        a.update({k: v for k, v in (("eps", args.eps), ("pgd_steps", args.pgd_steps)) if v is not None})
        adv = AdversarialAccuracy(**a)
        adv.specs = adv.build_specs(dm.info.default_eps)
        size = None if args.full_test else adv.subset_size
        x, y, idx = load_rank_subset(dm.measurement_dataset("test"), size, adv.subset_seed, 0, 1)
        print(
            f"[measure] attacks: {', '.join(adv.attacks)} at eps {sorted({s.eps for s in adv.specs})} on {len(x)} test samples ..."
        )
        metrics = adv.measure(net, x.to(dtype), y, idx)
        full = f"{adv.prefix}_full/"
        results.update({full + k.split("/", 1)[1] if args.full_test else k: v for k, v in metrics.items()})
        print(
            "[measure] "
            + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("adv/") and "/eps" in k)
        )

    name = ckpt.stem + (f"_{args.tag}" if args.tag else "")
    out = run_dir / "measurements" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "run_dir"}
    out.write_text(json.dumps({"checkpoint": str(ckpt), "settings": settings, "metrics": results}, indent=1))
    record = read_record(run_dir / RECORD)
    measured = record.get("checkpoint_measurements", {})
    measured[name] = {"checkpoint": str(ckpt), "settings": settings, "metrics": results}
    update_record(run_dir / RECORD, checkpoint_measurements=measured)
    print(f"[measure] wrote {out} and results.json:checkpoint_measurements[{name!r}]")
    return 0


def plot_density(dens, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
    grid = torch.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 1000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, dens.density(grid).clamp_min(1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian eigenvalue density (stochastic Lanczos quadrature)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[measure] density plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
