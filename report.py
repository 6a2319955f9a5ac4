"""Turn a sweep directory (finished or not) into one tidy CSV and the papers' figures.

    python report.py outputs/sweeps/fixed_lr_small [--out DIR] [--wandb] [verdict options]

Reads every job's ``results.json`` under the sweep directory and writes, into ``DIR``
(default ``<sweep dir>/report``):

- ``runs.csv``: one row per job: status, why it stopped, whether that was its training target
  (``reached_target``: empty when it had none), hyperparameters, final train/test loss and
  accuracy, generalization gap, Hessian eigenvalues, robust accuracies, wall time, the stability
  threshold 2(1+β)/lr, ``eos_ratio`` = λ1·lr/(2(1+β)) and ``lr_limited`` (eos_ratio >= 0.8);
- ``not_at_target.csv``: the completed runs that stopped short of their target (epoch or step cap);
- ``unconverged.csv``: the completed runs whose final measurement did not reach its stopping rule
  (``<prefix>/converged`` logged as 0: prefix, step, epoch, relative error); ``runs.csv`` names
  the prefixes in its ``unconverged`` column;
- ``verdicts.csv``, ``verdicts.md``: the study's trends judged over seeds (λ1, test and robust
  accuracy vs batch size; momentum; adversarial vs natural training), each with its per-seed
  values; the runs limited by lr; the worst-case gap (PGD vs AutoAttack) where measured;
- ``eigenvalue_vs_batch.png``: top Hessian eigenvalue vs batch size per (lr rule, momentum,
  training), with the stability threshold 2(1+β)/lr drawn, beside the final training loss;
- ``accuracy_vs_batch.png``: test accuracy and generalization gap vs batch size;
- ``robust_vs_eps.png``: robust accuracy vs eps, one line per batch size, per attack;
- ``momentum.png``: test accuracy and top eigenvalue vs batch size for each momentum,
  fixed lr vs constant ratio side by side (natural training only, when both kinds were run);
- ``natural_vs_robust.png``: natural vs adversarial training across batch sizes;
- ``landscape_1d_eigen.png``, ``landscape_1d_random.png``, ``density.png``, ``landscape_2d_*.png``: for
  runs measured with ``measure.py --landscape ... --density`` (arrays beside the run): the loss along
  the top Hessian eigenvector / random directions and the Hessian density, a panel per lr rule /
  training and a colour per batch size, and the 2-D loss as contours per run (``--contour-runs``);
- ``runs/<job>.png``: per-run curves over epochs (top eigenvalue with its 2(1+β)/lr line,
  train/test accuracy, robust accuracy).

Points are means over the seeds at target with error bars of one standard deviation; runs short of
their target are drawn as hollow squares, values of a measurement that did not converge as hollow
diamonds, and both are left out of the means and verdicts. A partial sweep is
reported as such, in notes: the grid's jobs with no result yet (the grid read from each
``multirun.yaml`` by Hydra's own override parser, values compared as values: ``1e6`` is the job
recorded as ``1000000.0``, see :mod:`lifecycle.sweep`), runs outside the grid, several records
of one job, jobs still running, failed or diverged, and each ``results.json`` that cannot be read
or is not a valid record (the note names the file and the field; skipped, never an abort). Every record under the sweep directory is read except those in the
report's own output folder.
With ``--wandb`` the table and figures are also logged as one W&B run of job type
``report`` in group and tag ``<experiment_name>`` (offline without credentials): the runs table, the
figures as native W&B line charts built from tables (``charts/*``: means over seeds vs batch
size per series, robust accuracy vs eps), and the PNGs as images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reporting.pipeline import report
from reporting.verdicts import Thresholds

__all__ = ["main", "report"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tables and figures of a sweep directory.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <sweep_dir>/report)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table and figures as a W&B report run"
    )
    parser.add_argument(
        "--contour-runs",
        nargs="*",
        default=None,
        help="runs drawn as 2-D landscape contours: jobs whose name contains one of these "
        "(default: the first seed of each lr rule / training and batch size)",
    )
    d = Thresholds()
    verdict = parser.add_argument_group("verdicts (verdicts.csv, verdicts.md)")
    verdict.add_argument(
        "--ratio-threshold", type=float, default=d.ratio, help=f"λ1 ratio called a change (default {d.ratio})"
    )
    verdict.add_argument(
        "--points-threshold",
        type=float,
        default=d.points,
        help=f"accuracy difference in points called a change (default {d.points})",
    )
    verdict.add_argument(
        "--min-seeds",
        type=int,
        default=d.min_seeds,
        help=f"seeds at target needed at each point compared (default {d.min_seeds})",
    )
    verdict.add_argument(
        "--eos-threshold",
        type=float,
        default=d.eos,
        help=f"eos_ratio = λ1·lr/(2(1+β)) from which a run counts as limited by lr (default {d.eos})",
    )
    verdict.add_argument(
        "--robust-eps",
        type=float,
        default=d.robust_eps,
        help=f"eps of the robust accuracy judged (default {d.robust_eps})",
    )
    verdict.add_argument(
        "--momenta",
        type=float,
        nargs=2,
        default=list(d.momenta),
        metavar=("LOW", "HIGH"),
        help="momentum verdicts compare HIGH against LOW (default 0 0.9)",
    )
    args = parser.parse_args(argv)
    try:
        th = Thresholds(
            args.ratio_threshold,
            args.points_threshold,
            args.min_seeds,
            args.eos_threshold,
            args.robust_eps,
            tuple(args.momenta),
        )
    except ValueError as e:
        parser.error(str(e))
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "report"
    df, notes = report(args.sweep_dir, out, th, args.contour_runs)
    print(f"[report] {len(df)} runs -> {out / 'runs.csv'}")
    print(f"[report] verdicts -> {out / 'verdicts.md'}")
    for png in sorted(out.rglob("*.png")):
        print(f"[report] figure: {png}")
    for note in notes:
        print(f"[report] note: {note}")
    if args.wandb:
        from reporting.wandb import log_to_wandb  # wandb is loaded only when asked for

        log_to_wandb(args.sweep_dir, out, df)
    return 0


if __name__ == "__main__":
    sys.exit(main())
