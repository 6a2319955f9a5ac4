"""The run's machine-readable result record (``results.json`` in the run directory).

The schema, written by :mod:`lifecycle.job` and :class:`RunRecord`:

- header, before training: ``status`` (see :data:`STATUSES`), ``overrides``, ``config`` (the
  resolved config), ``batch_plan``, ``provenance`` (:func:`provenance`), ``resumed_from``,
  ``started_at``, ``error``;
- ``history``: one row per logging call (``step``, ``epoch`` and the values), ``last``: the
  latest value of every metric; both filled by :class:`RunRecord` as training logs;
- ``stop_reason``, ``stopped_at_step``, ``stopped_at_epoch``: handed over by the
  ``TrainingTarget`` callback through :meth:`RunRecord.annotate`;
- at the end: ``status``, ``final`` (the last value of every per-epoch metric, then the final
  evaluation), ``wall_time_s``.

Which metrics are per-step: those whose name ends in ``_step`` (Lightning's own suffix for
``on_step`` values, :func:`is_per_step`); every other logged metric, including any a user's
callback logs, is per-epoch and lands in ``history``, ``last`` and ``final``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

RECORD = "results.json"
STATUSES = ("running", "completed", "diverged", "failed")
FINISHED = ("completed", "diverged")


def is_per_step(name: str) -> bool:
    """A per-step metric (``train/loss_step``); every other logged metric is per-epoch."""
    return name.endswith("_step")


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
    """A Lightning logger that collects the per-epoch metrics into ``results.json``.

    Everything any module or callback logs reaches it through ``log_metrics``, on rank 0 only,
    also under ``ddp_spawn`` where callback objects in the launching process never see the
    workers' state. It rewrites the JSON file on every call (small; nothing lost on
    interruption), so a resumed run appends to the same history. :meth:`annotate` takes
    run-level facts from callbacks (the stop reason).
    """

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
        pass  # the job lifecycle writes the resolved config into the record itself

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: _plain(v) for k, v in metrics.items() if not is_per_step(k)}
        if not row or set(row) <= {"epoch"}:
            return
        record = read_record(self.path)
        record.setdefault("history", []).append({"step": step, **row})
        record.setdefault("last", {}).update({k: v for k, v in row.items() if k != "epoch"})
        write_record(self.path, record)

    @rank_zero_only
    def annotate(self, **fields: Any) -> None:
        update_record(self.path, **fields)


def provenance() -> dict:
    """Where a result came from: the code's commit, library versions, machine."""
    import hydra
    import pytorch_lightning as pl

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        commit = ""
    return {
        "git_commit": commit or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "hydra": hydra.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
    }
