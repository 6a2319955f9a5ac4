"""The loggers of a job: the configured ones (CSV, W&B) plus the run record.

W&B never hangs a job: without credentials (and with ``WANDB_MODE`` unset) it runs offline and
says how to upload later; its run id is kept in the run directory, so a resumed job continues
the same W&B run; each job's run is finished before the next job of a multirun starts.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
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


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """The configured loggers plus the run record (``results.json``)."""
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None:
            continue
        if lcfg._target_.endswith("WandbLogger"):
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
