"""The run's machine-readable result record (``results.json`` in the run directory).

This module is the one home of the record: its schema (:data:`SCHEMA`, typed fields), its reader
(:func:`read_record`: every field checked, a wrong one named with the way out) and writers
(:func:`write_record`, :func:`update_record`, :func:`modify_record`: under the record's lock, through
a unique temporary file), and the facts read from it that more than one place needs
(:func:`reached_target`, :func:`training_target`, :data:`STOP_REASONS`, :func:`unconverged`,
:func:`stability_threshold`, :func:`time_split`). It imports the standard library only (and the
torch-free :mod:`lightning_modules.config` for the learning-rate facts), so reading a sweep's records
never imports torch or Lightning.

The schema, written by :mod:`lifecycle.job` and the record logger (:class:`lifecycle.loggers.RunRecord`):

- header, before training: ``status`` (see :data:`STATUSES`), ``overrides``, ``config`` (the
  resolved config), ``identity`` (:mod:`lifecycle.identity`), ``batch_plan``, ``provenance``
  (where the result came from: commit, versions, machine), ``resumed_from``,
  ``accepted_code_changes``, ``error``;
- ``data_on_device``: whether the training data was gathered on the device (``data.on_device``
  resolved; see :data:`lightning_modules.data.ON_DEVICE`), as the latest segment ran it;
- ``segments``: one entry per process that ran the job (``started_at``, ``from_step``,
  ``wall_time_s``, how it ``ended``; a segment killed without a word, e.g. by SIGKILL, keeps the
  wall time up to its last logged row and is marked ``killed`` by the next run); ``wall_time_s``
  is their sum: a resumed run is one run;
- ``history``: one row per logging call (``step``, ``epoch`` and the values); ``last``: the
  latest value of every metric and ``last_step`` the step it was logged at. A resumed run first
  drops the rows logged after the checkpoint it resumes from (:func:`truncate_history`), so each
  epoch is in it once;
- ``unconverged``: one entry per logged row in which a measurement did not reach its stopping
  rule (``step``, ``epoch``, ``prefix``, ``rel_error``; see :func:`unconverged`);
- ``stop_reason`` (one of :data:`STOP_REASONS`), ``stopped_at_step``, ``stopped_at_epoch`` (full
  epochs done): handed over by the ``TrainingTarget`` callback; a job that failed says ``failed``;
- at the end: ``status``, ``final`` (the last value of every per-epoch metric, then the final
  evaluation of the final weights), ``final_step`` (for each final value that came from the
  history, the ``step`` of its row) and ``time_split`` (where the wall time went);
- on failure: ``error`` (type and message) and ``traceback`` (its last lines).

Steps follow Lightning's logging convention: an epoch-end row of a run that has taken ``s``
optimizer steps has ``step = s - 1``; ``stopped_at_step`` counts optimizer steps.

The file is strict JSON: non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (:func:`plain`); the reader turns them back into floats wherever a number is expected.

Which metrics are per-step: those whose name ends in ``_step`` (Lightning's own suffix for
``on_step`` values, :func:`is_per_step`); every other logged metric, including any a user's
callback logs, is per-epoch and lands in ``history``, ``last`` and ``final``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_modules.config import effective_lr, stability_threshold

__all__ = [
    "RECORD",
    "STATUSES",
    "FINISHED",
    "STOP_REASONS",
    "TARGET_REASONS",
    "SCHEMA",
    "RecordError",
    "effective_lr",
    "stability_threshold",
    "is_per_step",
    "plain",
    "read_record",
    "check_record",
    "write_record",
    "update_record",
    "modify_record",
    "truncate_history",
    "time_split",
    "training_target",
    "reached_target",
    "run_lr",
    "unconverged",
]

RECORD = "results.json"
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
FINISHED = ("completed", "diverged")
TARGET_REASONS = ("target_train_acc", "target_train_loss")
STOP_REASONS = (*TARGET_REASONS, "diverged", "max_steps", "max_epochs", "failed")
"""Why training stopped: a target reached, the loss diverged, a step or epoch budget spent, or the
job failed (an exception, also one at the final measurement after the budget was spent)."""


def is_per_step(name: str) -> bool:
    """A per-step metric (``train/loss_step``); every other logged metric is per-epoch."""
    return name.endswith("_step")


class RecordError(ValueError):
    """A ``results.json`` that cannot be read; the message names the file, the field and the way out."""


# ---- values ------------------------------------------------------------------------------------
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def plain(v: Any) -> Any:
    """``v`` as strict JSON values: tensors as numbers, non-finite floats as "nan"/"inf"/"-inf"."""
    if hasattr(v, "tolist") and hasattr(v, "numel"):  # a tensor, without importing torch
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(v: Any) -> float | int | None:
    """A number, or a non-finite one as the record writes it; None if ``v`` is neither."""
    if _is_number(v):
        return v
    if isinstance(v, str) and v in NON_FINITE:
        return NON_FINITE[v]
    return None


# ---- the schema ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
    """One top-level field of the record: its kind, whether null is allowed, what it holds."""

    kind: str  # "str", "int", "number", "bool", "dict", "list", "str_list", "metrics", "steps", "rows"
    nullable: bool = True
    doc: str = ""


SCHEMA: dict[str, Field] = {
    "status": Field("str", nullable=False, doc=f"one of {', '.join(STATUSES)}"),
    "overrides": Field("str_list", doc="the command line's overrides"),
    "config": Field("dict", doc="the resolved config"),
    "identity": Field("dict", doc="training config, measurement settings and code hash"),
    "batch_plan": Field("dict", doc="global batch, world size, per-device and micro batch"),
    "provenance": Field("dict", doc="commit, library versions, machine"),
    "resumed_from": Field("str", doc="the checkpoint the last segment resumed from"),
    "data_on_device": Field("bool", doc="whether the latest segment gathered its batches on the device"),
    "hessian_products": Field("dict", doc="the Hessian callback's product mode, its timings, batch size"),
    "accepted_code_changes": Field("list", doc="code changes a user accepted"),
    "error": Field("str", doc="why the job failed or was interrupted"),
    "traceback": Field("str", doc="the last lines of the failure's traceback"),
    "segments": Field("rows", doc="one entry per launch that ran the job (its world, wall time)"),
    "wall_time_s": Field("number", doc="the segments' wall time, summed"),
    "history": Field("rows", doc="one row per logged epoch"),
    "last": Field("metrics", doc="the latest value of every per-epoch metric"),
    "last_step": Field("steps", doc="the step each latest value was logged at"),
    "unconverged": Field("rows", doc="measurements that did not reach their stopping rule"),
    "stop_reason": Field("str", doc=f"one of {', '.join(STOP_REASONS)}"),
    "stopped_at_step": Field("int", doc="optimizer steps taken"),
    "stopped_at_epoch": Field("int", doc="full epochs done"),
    "final": Field("metrics", doc="the final value of every metric"),
    "final_step": Field("steps", doc="the history step of each final value taken from it"),
    "time_split": Field("metrics", doc="where the wall time went, seconds"),
}
REQUIRED_WHEN_FINISHED = ("config", "identity", "final", "wall_time_s", "stop_reason")
"""A finished record holds at least these: without them it is not a result."""


def _check_field(name: str, field: Field, v: Any) -> tuple[Any, str | None]:
    """(normalized value, None) or (None, what is wrong)."""
    if v is None:
        return (None, None) if field.nullable else (None, "is null")
    kind = field.kind
    if kind == "str":
        return (v, None) if isinstance(v, str) else (None, f"is a {type(v).__name__}, not a string")
    if kind == "int":
        ok = _is_number(v) and float(v).is_integer()
        return (int(v), None) if ok else (None, f"is {v!r}, not a whole number")
    if kind == "number":
        n = _number(v)
        return (n, None) if n is not None else (None, f"is {v!r}, not a number")
    if kind == "bool":
        return (v, None) if isinstance(v, bool) else (None, f"is {v!r}, not true or false")
    if kind == "dict":
        return (v, None) if isinstance(v, dict) else (None, f"is a {type(v).__name__}, not an object")
    if kind == "list":
        return (v, None) if isinstance(v, list) else (None, f"is a {type(v).__name__}, not a list")
    if kind == "str_list":
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        return (v, None) if ok else (None, "is not a list of strings")
    if kind == "rows":
        if not isinstance(v, list):
            return None, f"is a {type(v).__name__}, not a list"
        for i, row in enumerate(v):
            if not isinstance(row, dict):
                return None, f"entry {i} is a {type(row).__name__}, not an object"
            for key in ("step", "epoch", "wall_time_s", "from_step", "started_unix"):
                if row.get(key) is not None and _number(row[key]) is None:
                    return None, f"entry {i}: {key} is {row[key]!r}, not a number"
        return v, None
    if kind == "metrics":  # name -> number (non-finite as "nan"/"inf"), or a list of numbers
        if not isinstance(v, dict):
            return None, f"is a {type(v).__name__}, not an object"
        for key, x in v.items():
            if (
                x is not None
                and _number(x) is None
                and not (isinstance(x, list) and all(_number(y) is not None for y in x))
            ):
                return None, f"{key} is {x!r}, not a number"
        return v, None
    if kind == "steps":
        if not isinstance(v, dict):
            return None, f"is a {type(v).__name__}, not an object"
        for key, x in v.items():
            if x is not None and not _is_number(x):
                return None, f"{key} is {x!r}, not a step"
        return v, None
    raise AssertionError(f"unknown field kind {kind}")


def check_record(record: Any, where: str = "the record") -> dict:
    """``record`` with every known field checked against :data:`SCHEMA` (and top-level non-finite
    numbers read back as floats); :class:`RecordError` naming the first bad field otherwise.

    Unknown fields are kept (a newer version's record stays readable). A finished record must hold
    :data:`REQUIRED_WHEN_FINISHED`."""
    way_out = (
        "Restore it from a backup, or run the job again with fresh=true (its old result is then deleted)."
    )
    if not isinstance(record, dict):
        raise RecordError(f"{where} is a JSON {type(record).__name__}, not an object. {way_out}")
    if not record:
        return {}
    out = dict(record)
    if "status" not in record:
        raise RecordError(f"{where} has no status field. {way_out}")
    for name, field in SCHEMA.items():
        if name not in record:
            continue
        value, problem = _check_field(name, field, record[name])
        if problem:
            raise RecordError(f"{where}: field {name!r} {problem} (expected: {field.doc}). {way_out}")
        out[name] = value
    if out["status"] not in STATUSES:
        raise RecordError(
            f"{where}: field 'status' is {out['status']!r} (expected: one of {', '.join(STATUSES)}). {way_out}"
        )
    if out["status"] in FINISHED:
        missing = [name for name in REQUIRED_WHEN_FINISHED if out.get(name) is None]
        if missing:
            raise RecordError(
                f"{where}: a {out['status']} record without {', '.join(missing)} is not a result. {way_out}"
            )
    identity = out.get("identity")
    if identity is not None and not all(
        isinstance(identity.get(k), t) for k, t in (("training", dict), ("measurement", dict), ("code", str))
    ):
        raise RecordError(f"{where}: field 'identity' lacks its training/measurement/code parts. {way_out}")
    return out


def read_record(path: str | os.PathLike) -> dict:
    """The checked record at ``path`` ({} if there is none); :class:`RecordError` if it is not
    valid JSON or not a valid record (:func:`check_record`)."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        record = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(
            f"{p} is not a readable result record ({e}). Restore it from a backup, or fresh=true "
            "to train this job again (its old result is then deleted)."
        ) from None
    return check_record(record, str(p))


# ---- writing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the record's lock (``results.json.lock`` beside it; ``flock``, released by the kernel if
    the process dies) for one read-modify-write, so two writers never lose each other's update."""
    p = Path(path)
    with open(p.with_name(p.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write(p: Path, record: dict) -> None:
    """Atomic write through a temporary file of its own: a reader never sees half a file."""
    text = json.dumps(plain(record), indent=1, allow_nan=False, default=str)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a record is as readable as any file the user writes
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Replace the record at ``path`` with ``record`` (under its lock, atomically)."""
    p = Path(path)
    with record_lock(p):
        _write(p, record)


def modify_record(path: str | os.PathLike, change: Callable[[dict], Any]) -> dict:
    """Read the record, let ``change(record)`` edit it in place, write it back: all under the
    record's lock. Returns the record written."""
    p = Path(path)
    with record_lock(p):
        record = read_record(p)
        change(record)
        _write(p, record)
    return record


def update_record(path: str | os.PathLike, **fields: Any) -> dict:
    """Set top-level ``fields`` of the record (under its lock). Returns the record written."""
    return modify_record(path, lambda record: record.update({k: plain(v) for k, v in fields.items()}))


def truncate_history(path: str | os.PathLike, step: int) -> None:
    """Keep the history rows logged at or before ``step`` (-1: none); ``last`` and ``unconverged``
    follow the rows kept. A run resumed from a checkpoint at ``step`` logs everything after it again."""

    def keep(record: dict) -> None:
        if not record.get("history") and not record.get("unconverged"):
            return
        kept = [
            row for row in record.get("history") or [] if row.get("step") is not None and row["step"] <= step
        ]
        last, last_step = {}, {}
        for row in kept:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    last[k], last_step[k] = v, row["step"]
        flags = [
            u for u in record.get("unconverged") or [] if u.get("step") is not None and u["step"] <= step
        ]
        record.update(history=kept, last=last, last_step=last_step, unconverged=flags)

    if Path(path).exists():
        modify_record(path, keep)


# ---- facts read from a record -------------------------------------------------------------------
def time_split(record: Mapping) -> dict[str, float]:
    """Where the run's wall time went, in seconds: every per-epoch ``<part>/seconds`` metric summed
    over the history (``hessian``, ``adv``, ``eval``, a user's measurement...), and ``training``:
    the rest of ``wall_time_s`` (the training steps, and what nothing timed: start-up, checkpoints)."""
    parts: dict[str, float] = {}
    for row in record.get("history") or []:
        for key, value in row.items():
            if key.endswith("/seconds") and _is_number(value):
                part = key.removesuffix("/seconds")
                parts[part] = parts.get(part, 0.0) + value
    wall = _number(record.get("wall_time_s")) or 0.0
    return {"training": max(wall - sum(parts.values()), 0.0), **dict(sorted(parts.items()))}


def training_target(record: Mapping) -> str | None:
    """The run's training target as text (``train acc >= 0.97``), or None when it had none."""
    callbacks = (record.get("config") or {}).get("callbacks") or {}
    t = callbacks.get("training_target") or {} if isinstance(callbacks, dict) else {}
    parts = []
    if _is_number(t.get("target_train_acc")):
        parts.append(f"train acc >= {t['target_train_acc']:g}")
    if _is_number(t.get("target_train_loss")):
        parts.append(f"train loss <= {t['target_train_loss']:g}")
    return " or ".join(parts) or None


def reached_target(record: Mapping) -> bool | None:
    """Whether the run stopped because it reached its training target (``stop_reason`` in
    :data:`TARGET_REASONS`). None for a run with no target configured: it ran its budget by design,
    there was nothing to reach, and it is compared where it stopped."""
    if record.get("stop_reason") in TARGET_REASONS:
        return True
    return None if training_target(record) is None else False


def run_lr(record: Mapping) -> tuple[float | None, float | None]:
    """The run's effective learning rate (before any schedule) and momentum, from its config."""
    opt = (record.get("config") or {}).get("optimizer") or {}
    lr = effective_lr(opt.get("lr_rule"), opt.get("lr"), opt.get("lr_ratio"), opt.get("batch_size"))
    return lr, opt.get("momentum")


def unconverged(values: Mapping[str, Any]) -> list[str]:
    """The measurement prefixes whose values in ``values`` (a history row, ``last`` or ``final``)
    did not reach their stopping rule: ``<prefix>/converged`` logged as 0. Their other
    ``<prefix>/...`` values are estimates short of the promised accuracy, never to be shown as results."""
    out = []
    for key, v in values.items():
        if key.endswith("/converged"):
            n = _number(v)
            if n is not None and n < 1:
                out.append(key.removesuffix("/converged"))
    return sorted(out)
