"""The loggers of a job: the configured ones (CSV, W&B) plus the run record.

The CSV log of a resumed run is one log: it keeps the rows written up to the checkpoint the run
resumes from and appends the rest (Lightning's ``CSVLogger`` deletes the file when a run resumes
into the same folder). W&B never hangs a job: without credentials (and with ``WANDB_MODE`` unset) it runs offline and
says how to upload later; its run id is kept in the run directory, so a resumed job continues
the same W&B run; each job's run is finished before the next job of a multirun starts.
"""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from lifecycle.record import RECORD, RunRecord, is_per_step


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """``"offline"`` when W&B would otherwise fail or hang (no mode set, no credentials), else None."""
    return None if os.environ.get("WANDB_MODE") or wandb_has_credentials() else "offline"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with every per-epoch metric on an ``epoch`` axis.

    W&B plots against a step counter by default. Each metric is defined the first time it is
    logged: per-epoch metrics (all but the per-step ones, :func:`lifecycle.record.is_per_step`),
    whichever module or callback logs them, get ``epoch`` as their x axis and their last value
    in the run summary.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._defined: set[str] = set()

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        new = [k for k in metrics if k not in self._defined and k != "epoch" and not is_per_step(k)]
        if new:
            run = self.experiment
            if not self._defined:
                run.define_metric("epoch")
            for name in new:
                run.define_metric(name, step_metric="epoch", summary="last")
            self._defined.update(new)
        super().log_metrics(metrics, step)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` keeps its rows up to ``keep_until_step``."""

    def __init__(self, log_dir: str, keep_until_step: int):
        self.keep_until_step = keep_until_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [
                r
                for r in reader
                if r.get("step") not in (None, "") and float(r["step"]) <= self.keep_until_step
            ]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` whose file survives a resume (rows up to ``keep_until_step`` are kept).

    Args:
        keep_until_step: the step of the checkpoint the run resumes from; -1 (a fresh run) keeps
            nothing. Other arguments as Lightning's ``CSVLogger``.
    """

    def __init__(self, *args, keep_until_step: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_until_step = keep_until_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.keep_until_step)
        return self._experiment


def build_loggers(cfg: DictConfig, out_dir: Path, keep_until_step: int = -1) -> list:
    """The configured loggers plus the run record (``results.json``).

    ``keep_until_step``: the step of the checkpoint a resumed run starts from (-1: a fresh run)."""
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None:
            continue
        if lcfg._target_ == f"{__name__}.CSVLogger":
            loggers.append(hydra.utils.instantiate(lcfg, keep_until_step=keep_until_step))
        elif lcfg._target_.endswith("WandbLogger"):
            id_file = out_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(
                    hashlib.sha1(f"{out_dir.resolve()}{time.time()}".encode()).hexdigest()[:16]
                )
            extra = {
                "id": id_file.read_text().strip(),
                "resume": "allow",
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
            if wandb_mode() == "offline":
                extra["mode"] = "offline"  # per run: does not leak into later jobs like offline=True does
                print(
                    f"[train] W&B: no credentials found, logging offline. Upload later with:\n"
                    f"    wandb sync {out_dir / 'wandb'}/offline-run-*"
                )
            loggers.append(hydra.utils.instantiate(lcfg, _partial_=True)(**extra))
        else:
            loggers.append(hydra.utils.instantiate(lcfg))
    loggers.append(RunRecord(out_dir / RECORD))
    return loggers


def finish_wandb() -> None:
    """End this job's W&B run, so the next job of a multirun gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
