"""A run read back for re-measurement (``measure.py``): its checked record, its checkpoint, its network.

Refusals that a measurement must make before it spends minutes (an unreadable record, a run
directory it could not save into) raise :class:`Refused` with the way out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lifecycle.build import build_model
from lifecycle.record import RECORD, RecordError, read_record


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if which == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
    elif which == "best":
        found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
        path = found[-1] if found else run_dir / "checkpoints" / "best-missing.ckpt"
    else:
        path = Path(which)
    if not path.exists():
        raise SystemExit(f"error: no checkpoint {path} (--checkpoint last | best | a path)")
    return path


class Refused(Exception):
    """The run cannot be measured (exit status 2): the message says why and the way out."""


def read_run(run_dir: Path) -> dict:
    """The run's checked record; :class:`Refused` with :func:`read_record`'s message (which names the
    field) if it fails its checks, or if it holds no config to rebuild the model from."""
    try:
        record = read_record(run_dir / RECORD)
    except RecordError as e:
        raise Refused(str(e)) from None
    if not (run_dir / RECORD).exists():
        raise Refused(f"{run_dir} has no {RECORD}: is this a run directory of train.py?")
    if not record.get("config"):
        raise Refused(f"{run_dir}/{RECORD} has no config: is this a run directory of train.py?")
    if not isinstance(record.get("checkpoint_measurements", {}), dict):
        raise Refused(
            f"{run_dir}/{RECORD}: field 'checkpoint_measurements' is not an object (expected: one result "
            "per measurement name). Restore the record from a backup, or remove that field."
        )
    return record


def check_writable(run_dir: Path) -> None:
    """Refuse before measuring if the results could not be saved (a read-only run directory)."""
    for d in (run_dir, run_dir / "measurements"):
        if not d.exists():
            continue
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise Refused(
                f"cannot write into {d} ({e.strerror}): the results would be lost after measuring. "
                "Make it writable, or copy the run directory somewhere writable and measure the copy."
            ) from None
    record = run_dir / RECORD
    if not os.access(record, os.W_OK):
        raise Refused(f"cannot write {record}: the results would be lost after measuring. Make it writable.")


def load_model(run_dir: Path, checkpoint: Path, float64: bool):
    """The run's network with the checkpoint's weights, its resolved config and the checkpoint's step."""
    cfg = OmegaConf.create(read_run(run_dir)["config"])
    net = build_model(cfg)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return (net.double() if float64 else net), cfg, saved.get("global_step")
