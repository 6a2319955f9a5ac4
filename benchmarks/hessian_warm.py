"""Hessian-vector products per epoch-end measurement over a real training run: cold vs warm start,
the eigenvalue stop vs the former residual stop, and (optionally) the error against a float64
reference measured on the same weights.

One ``train.py`` run (the default model and data unless overridden) carries several instances of
:class:`callbacks.hessian_spectrum.HessianSpectrum` on the same fixed samples, so every epoch's
weights are measured by each of them (each restores the RNG, so training is that of the default
run):

- ``hessian``: the default (eigenvalue stop, tol 1e-4, cold start);
- ``hessian_warm``: the same, warm-started from the previous epoch's Ritz vectors;
- ``hessian_old``: the former default (residual stop, tol 1e-5, cold);
- ``hessian_ref`` (``--reference``): float64 copy of the network, eigenvalue stop at 1e-9.

    python benchmarks/hessian_warm.py                        # 10 epochs, 1,000 samples (~6 min on 2 cores)
    python benchmarks/hessian_warm.py --reference            # + float64 reference (much longer on a CPU)
    python benchmarks/hessian_warm.py --subset 256 --reference --no-smallest

Prints one row per epoch (products, and the largest error against the reference in units of
|λ_1|) and the totals. Runs with 1 torch thread (``threads=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
TARGET = "callbacks.hessian_spectrum.HessianSpectrum"


def instance(name: str, settings: dict) -> list[str]:
    """Hydra overrides that add one more HessianSpectrum under ``callbacks.<name>``."""
    return [f"+callbacks.{name}._target_={TARGET}", f"+callbacks.{name}.prefix={name}"] + [
        f"+callbacks.{name}.{k}={v}" for k, v in settings.items()
    ]


def overrides(epochs: int, subset: int, smallest: bool, reference: bool, extra: list[str]) -> list[str]:
    common = {"subset_size": subset, "batch_size": min(500, subset), "smallest": str(smallest).lower()}
    args = [f"trainer.max_epochs={epochs}", "threads=1", "logger=none", "trainer.enable_progress_bar=false",
            "~callbacks.adversarial", *[f"callbacks.hessian.{k}={v}" for k, v in common.items()],
            *instance("hessian_warm", {**common, "warm_start": "true"}),
            *instance("hessian_old", {**common, "stop": "residual", "tol": 1e-5})]  # fmt: skip
    if reference:
        args += instance("hessian_ref", {**common, "float64": "true", "tol": 1e-9, "max_iter": 300})
    return [*args, *extra]


def per_epoch(record: dict, prefixes: list[str]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for row in record["history"]:
        if any(k.startswith(f"{prefixes[0]}/") for k in row):
            rows.setdefault(int(row["epoch"]), {}).update(row)
    return rows


def values(row: dict, prefix: str, smallest: bool) -> list[float]:
    names = sorted(k for k in row if k.startswith(f"{prefix}/lambda_") and k[len(prefix) + 8 :].isdigit())
    out = [row[k] for k in names]
    return out + ([row[f"{prefix}/lambda_min"]] if smallest else [])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=1000, help="fixed training samples of the Hessian")
    parser.add_argument("--no-smallest", action="store_true", help="top-k only (no lambda_min)")
    parser.add_argument("--reference", action="store_true", help="also a float64 reference per epoch")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = parser.parse_args()
    smallest = not args.no_smallest
    with tempfile.TemporaryDirectory() as log_dir:
        cmd = [sys.executable, str(ROOT / "train.py"),
               *overrides(args.epochs, args.subset, smallest, args.reference, args.overrides)]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "SGD_LOG_DIR": log_dir, "WANDB_MODE": "disabled"}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        (result,) = Path(log_dir).rglob("results.json")
        record = json.loads(result.read_text())
    prefixes = ["hessian", "hessian_warm", "hessian_old"] + (["hessian_ref"] if args.reference else [])
    rows = per_epoch(record, prefixes)
    print(f"machine: {cpu_model()}, 1 torch thread; model {record['config']['model']['_target_']}, "
          f"{args.subset} fixed training samples, top-{record['config']['callbacks']['hessian']['k']}"
          f"{' + lambda_min' if smallest else ''}, {args.epochs} epochs; run wall time "
          f"{record['wall_time_s']:.0f} s")  # fmt: skip
    head = f"{'epoch':>5}{'lambda_1':>10}" + "".join(
        f"{p.removeprefix('hessian_') or 'default':>12}" for p in prefixes[:3]
    )
    head += (
        "".join(f"{'err ' + (p.removeprefix('hessian_') or 'default'):>14}" for p in prefixes[:3])
        if args.reference
        else ""
    )
    head += f"{'warm?':>6}"
    print(head + "\n" + "-" * len(head))
    totals = dict.fromkeys(prefixes, 0.0)
    seconds = dict.fromkeys(prefixes, 0.0)
    worst = dict.fromkeys(prefixes, 0.0)
    for epoch, row in sorted(rows.items()):
        line = f"{epoch:>5}{row['hessian/lambda_1']:>10.4g}"
        for p in prefixes:
            totals[p] += row[f"{p}/n_hvp"]
            seconds[p] += row[f"{p}/seconds"]
        line += "".join(f"{int(row[f'{p}/n_hvp']):>12d}" for p in prefixes[:3])
        if args.reference:
            ref = values(row, "hessian_ref", smallest)
            scale = abs(ref[0])
            for p in prefixes[:3]:
                err = max(abs(a - b) for a, b in zip(values(row, p, smallest), ref, strict=True)) / scale
                worst[p] = max(worst[p], err)
                line += f"{err:>14.1e}"
        print(line + f"{int(row['hessian_warm/warm']):>6d}")
    print("total products: " + ", ".join(f"{p} {int(totals[p])} ({seconds[p]:.1f} s)" for p in prefixes))
    print(f"warm / cold products: {totals['hessian_warm'] / totals['hessian']:.2f}; "
          f"eigenvalue stop / former residual stop: {totals['hessian'] / totals['hessian_old']:.2f}")  # fmt: skip
    if args.reference:
        print("largest error vs the float64 reference (units of |lambda_1|): "
              + ", ".join(f"{p} {worst[p]:.1e}" for p in prefixes[:3]))  # fmt: skip


if __name__ == "__main__":
    main()
