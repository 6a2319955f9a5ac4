"""Train one classifier with chosen SGD hyperparameters; measure curvature and robustness.

    python train.py                          # LeNet on the embedded MNIST digits, a few minutes on CPU
    python train.py model=c1 optimizer.batch_size=512
    python train.py -m experiment=fixed_lr_small   # a sweep

Every job writes into its own directory (a function of its overrides): the resolved config,
logs, checkpoints and ``results.json`` (status, why it stopped, per-epoch and final metrics,
provenance). Re-running the same command resumes from ``checkpoints/last.ckpt`` or, if the job
already finished, prints its summary; ``fresh=true`` starts over. The job's lifecycle lives in
:mod:`lifecycle`; this file is only the Hydra entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lifecycle.job import EXIT_FAILED, JobOutcome, run_job
from lifecycle.rundir import register_resolvers


class JobOutcomes:
    """How the jobs of this process ended, collected by the Hydra task function.

    Hydra's basic launcher calls the task function once per job within one process and goes on
    to the next job when it returns, so a job that failed must return (not exit) for the sweep to
    go on. The task function is a closure over one instance of this class (:func:`hydra_main`),
    created where the process starts (``__main__``), so what the jobs did reaches the exit status
    without module-global state; a test can create its own instance.
    """

    def __init__(self) -> None:
        self.outcomes: list[JobOutcome] = []
        self.multirun = False

    def add(self, outcome: JobOutcome, multirun: bool) -> None:
        self.outcomes.append(outcome)
        self.multirun = self.multirun or multirun

    def exit_code(self) -> int:
        """A single run's own exit status; in a multirun 1 if any job failed, after saying which."""
        failed = [o for o in self.outcomes if o.failed]
        if not failed:
            return 0
        if not self.multirun:
            return failed[0].exit_code
        print(
            f"[train] {len(failed)} job(s) failed: " + ", ".join(str(o.out_dir) for o in failed),
            file=sys.stderr,
        )
        return EXIT_FAILED


def hydra_main(outcomes: JobOutcomes):
    """Hydra's entry point, each job's outcome added to ``outcomes``."""

    @hydra.main(version_base="1.3", config_path="conf", config_name="train")
    def main(cfg: DictConfig) -> float | None:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        outcome = run_job(cfg, Path(hc.runtime.output_dir), multirun=multirun)
        outcomes.add(outcome, multirun)
        return outcome.val_acc  # what a sweeper that optimizes would read

    return main


if __name__ == "__main__":
    register_resolvers()
    jobs = JobOutcomes()
    hydra_main(jobs)()
    sys.exit(jobs.exit_code())
