"""One job's lifecycle: check and build, then train fresh, resume, or skip a finished job.

The record (``results.json``, :mod:`lifecycle.record`) says ``running`` once everything is
built and checked, and ``completed`` or ``diverged`` at the end; a bad config value is recorded
as ``failed`` with its message and exits with status 2 (in a multirun: the other jobs go on and
the sweep exits with status 1). A job directory outside ``paths.log_dir`` is refused the same
way, before anything is written into it.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from lifecycle.build import build_job
from lifecycle.loggers import build_loggers, finish_wandb
from lifecycle.record import FINISHED, RECORD, provenance, read_record, update_record
from lifecycle.rundir import RunDirError, check_inside
from lifecycle.summary import summarize
from lightning_modules.config import ConfigError
from lightning_modules.data import DataUnavailable
from lightning_modules.models import has_batchnorm

failed_jobs: list[str] = []
"""Run directories of the jobs of this process that failed (a multirun goes on; the exit code says so)."""


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def run_job(cfg: DictConfig, out_dir: Path, multirun: bool = False) -> float | None:
    """Run (or resume, or skip) one job; returns the final validation accuracy."""
    start = time.time()
    try:
        check_inside(out_dir, cfg.paths.log_dir)  # before anything of ours is written there
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            failed_jobs.append(str(out_dir))
            return None
        sys.exit(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / RECORD
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    try:
        job = build_job(cfg, multirun)
        if rank_zero:
            job.datamodule.prepare_data()  # offline and no files: one clear error, before any training
    except (ConfigError, DataUnavailable) as e:
        if rank_zero:
            update_record(record_path, status="failed", error=str(e), overrides=_overrides())
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            failed_jobs.append(str(out_dir))
            return None
        sys.exit(2)

    if cfg.fresh and rank_zero:
        for p in ("checkpoints", "csv", "wandb", RECORD, "wandb_id.txt"):
            target = out_dir / p
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    previous = read_record(record_path)
    if previous.get("status") in FINISHED and not cfg.fresh:
        print(f"[train] this job already finished ({previous['status']}); fresh=true trains it again.")
        print(summarize(previous, out_dir))
        return previous.get("final", {}).get("val/acc")
    last_ckpt = out_dir / "checkpoints" / "last.ckpt"
    resume = last_ckpt if last_ckpt.exists() and not cfg.fresh else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = job.plan
    if rank_zero:
        update_record(
            record_path,
            status="running",
            overrides=_overrides(),
            config=OmegaConf.to_container(cfg, resolve=True),
            batch_plan=dataclasses.asdict(plan),
            provenance=provenance(),
            resumed_from=str(resume) if resume else None,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            error=None,
        )
        if resume:
            print(f"[train] resuming from {resume}")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=job.callbacks,
        logger=build_loggers(cfg, out_dir),
        accumulate_grad_batches=plan.accumulate,
        use_distributed_sampler=False,
        default_root_dir=str(out_dir),
    )
    if plan.world_size > 1 and not cfg.trainer.sync_batchnorm and has_batchnorm(job.module.net) and rank_zero:
        print(
            f"[train] note: BatchNorm uses per-device statistics over {plan.micro_batch} samples "
            f"(no SyncBatchNorm on this run); the global batch is {plan.global_batch}."
        )
    try:
        trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=str(resume) if resume else None)
        trainer.validate(job.module, datamodule=job.datamodule, verbose=False)  # final metrics, all eval sets
    finally:
        finish_wandb()
    if not rank_zero:
        return None
    record = read_record(record_path)
    # the latest value of everything logged (measurements too), then the final evaluation
    final = {
        **record.get("last", {}),
        **{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    status = "diverged" if record.get("stop_reason") == "diverged" else "completed"
    record = update_record(record_path, status=status, final=final, wall_time_s=time.time() - start)
    print(summarize(record, out_dir))
    return final.get("val/acc")
