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

from lifecycle.job import failed_jobs, run_job
from lifecycle.rundir import register_resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    return run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    register_resolvers()
    main()
    if failed_jobs:
        print(f"[train] {len(failed_jobs)} job(s) failed: " + ", ".join(failed_jobs), file=sys.stderr)
        sys.exit(1)
