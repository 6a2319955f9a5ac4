"""The run's machine-readable result record (``results.json`` in the run directory).

:class:`RunRecord` is a Lightning *logger*: everything any module or callback logs (per-epoch
metrics, Hessian and attack measurements) reaches it through ``log_metrics``, on rank 0 only,
also under ``ddp_spawn`` where callback objects in the launching process never see the
workers' state. It rewrites the JSON file on every call (small; nothing lost on interruption),
so a resumed run appends to the same history. ``train.py`` writes the header (config,
provenance) before training and the status, final metrics and wall time after it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_record(path: str | os.PathLike) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Atomic write: a reader (or an interrupted run) never sees half a file."""
    p = Path(path)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False, default=str))
    os.replace(tmp, p)


def update_record(path: str | os.PathLike, **fields: Any) -> dict:
    record = read_record(path)
    record.update({k: _plain(v) for k, v in fields.items()})
    write_record(path, record)
    return record


class RunRecord(Logger):
    """Collects logged metrics into ``results.json``: ``history`` (one row per logging call with its
    step and epoch) and ``last`` (the latest value of every metric)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "run_record"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # train.py writes the resolved config into the record itself

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: _plain(v) for k, v in metrics.items() if not k.endswith("_step")}
        if not row or set(row) <= {"epoch"}:
            return
        record = read_record(self.path)
        record.setdefault("history", []).append({"step": step, **row})
        record.setdefault("last", {}).update({k: v for k, v in row.items() if k != "epoch"})
        write_record(self.path, record)

    @rank_zero_only
    def annotate(self, **fields: Any) -> None:
        update_record(self.path, **fields)


def annotate_run(trainer, **fields: Any) -> None:
    """Write fields (e.g. the stop reason) into every RunRecord of ``trainer`` (rank 0)."""
    for logger in trainer.loggers:
        if isinstance(logger, RunRecord):
            logger.annotate(**fields)


def log_after_training(trainer, metrics: dict[str, float]) -> None:
    """Log metrics where Lightning forbids ``self.log`` (``on_train_end``): straight to the loggers
    (rank 0), and into ``trainer.callback_metrics`` so the caller of ``fit`` sees them."""
    values = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        # the epoch that just ended (Lightning has already advanced its counter), as self.log would add
        row = {**values, "epoch": float(max(trainer.current_epoch - 1, 0))}
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
            logger.save()
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
