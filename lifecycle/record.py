"""The run's machine-readable result record (``results.json`` in the run directory).

The schema, written by :mod:`lifecycle.job` and :class:`RunRecord`:

- header, before training: ``status`` (see :data:`STATUSES`), ``overrides``, ``config`` (the
  resolved config), ``identity`` (:mod:`lifecycle.identity`), ``batch_plan``, ``provenance``
  (:func:`provenance`), ``resumed_from``, ``accepted_code_changes``, ``error``;
- ``segments``: one entry per process that ran the job (``started_at``, ``from_step``,
  ``wall_time_s``, how it ``ended``; a segment killed without a word, e.g. by SIGKILL, keeps the
  wall time up to its last logged row and is marked ``killed`` by the next run); ``wall_time_s``
  is their sum: a resumed run is one run;
- ``history``: one row per logging call (``step``, ``epoch`` and the values); ``last``: the
  latest value of every metric and ``last_step`` the step it was logged at; filled by
  :class:`RunRecord` as training logs. A resumed run first drops the rows logged after the
  checkpoint it resumes from (:func:`truncate_history`), so each epoch is in it once;
- ``stop_reason``, ``stopped_at_step``, ``stopped_at_epoch`` (full epochs done): handed over by
  the ``TrainingTarget`` callback through :meth:`RunRecord.annotate`;
- at the end: ``status``, ``final`` (the last value of every per-epoch metric, then the final
  evaluation of the final weights) and ``final_step`` (for each final value that came from the
  history, the ``step`` of its row);

Steps follow Lightning's logging convention: an epoch-end row of a run that has taken ``s``
optimizer steps has ``step = s - 1``; ``stopped_at_step`` counts optimizer steps.
- ``time_split``: where the wall time went (:func:`time_split`), at the end;
- on failure: ``error`` (type and message) and ``traceback`` (its last lines).

The file is strict JSON: non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (:func:`plain`), which ``float()`` reads back.

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
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

RECORD = "results.json"
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
FINISHED = ("completed", "diverged")


def is_per_step(name: str) -> bool:
    """A per-step metric (``train/loss_step``); every other logged metric is per-epoch."""
    return name.endswith("_step")


class RecordError(ValueError):
    """A ``results.json`` that cannot be read; the message names the file and the way out."""


def plain(v: Any) -> Any:
    """``v`` as strict JSON values: tensors as numbers, non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_record(path: str | os.PathLike) -> dict:
    """The record at ``path`` ({} if there is none); :class:`RecordError` if it is not valid JSON."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(
            f"{p} is not a readable result record ({e}). Restore it from a backup, or fresh=true "
            "to train this job again (its old result is then deleted)."
        ) from None


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Atomic write: a reader (or an interrupted run) never sees half a file."""
    p = Path(path)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plain(record), indent=1, allow_nan=False, default=str))
    os.replace(tmp, p)


def update_record(path: str | os.PathLike, **fields: Any) -> dict:
    record = read_record(path)
    record.update({k: plain(v) for k, v in fields.items()})
    write_record(path, record)
    return record


def time_split(record: dict) -> dict[str, float]:
    """Where the run's wall time went, in seconds: every per-epoch ``<part>/seconds`` metric summed
    over the history (``hessian``, ``adv``, ``eval``, a user's measurement...), and ``training``:
    the rest of ``wall_time_s`` (the training steps, and what nothing timed: start-up, checkpoints)."""
    parts: dict[str, float] = {}
    for row in record.get("history", []):
        for key, value in row.items():
            if key.endswith("/seconds") and isinstance(value, int | float):
                part = key.removesuffix("/seconds")
                parts[part] = parts.get(part, 0.0) + value
    wall = record.get("wall_time_s", 0.0)
    return {"training": max(wall - sum(parts.values()), 0.0), **dict(sorted(parts.items()))}


def truncate_history(path: str | os.PathLike, step: int) -> None:
    """Keep the history rows logged at or before ``step`` (-1: none); ``last`` follows the rows kept.

    A run resumed from a checkpoint at ``step`` logs everything after it again."""
    record = read_record(path)
    if not record.get("history"):
        return
    kept = [row for row in record["history"] if row.get("step") is not None and row["step"] <= step]
    last, last_step = {}, {}
    for row in kept:
        for k, v in row.items():
            if k not in ("step", "epoch"):
                last[k], last_step[k] = v, row["step"]
    record.update(history=kept, last=last, last_step=last_step)
    write_record(path, record)


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
        row = {k: plain(v) for k, v in metrics.items() if not is_per_step(k)}
        if not row or set(row) <= {"epoch"}:
            return
        record = read_record(self.path)
        record.setdefault("history", []).append({"step": step, **row})
        values = {k: v for k, v in row.items() if k != "epoch"}
        record.setdefault("last", {}).update(values)
        record.setdefault("last_step", {}).update(dict.fromkeys(values, step))
        segment = (record.get("segments") or [{}])[-1]
        if "started_unix" in segment:  # a heartbeat: a segment that dies keeps its time so far
            segment["wall_time_s"] = time.time() - segment["started_unix"]
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
