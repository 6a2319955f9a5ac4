"""What a run's result belongs to: its training config, its measurement settings and the code.

A run directory is named by its overrides (:mod:`lifecycle.rundir`), but a result belongs to
more than that: the YAML defaults and the code can change under the same command. Each record
keeps an ``identity``:

- ``training``: the resolved config without the keys that do not change what is trained
  (:data:`NOT_TRAINING`) and without the measurement callbacks' settings, flattened to
  ``{"optimizer.lr": 0.01, ...}``;
- ``measurement``: the measurement callbacks' settings (``callbacks.<name>.*`` of every callback
  that subclasses :class:`callbacks.epoch_measurement.EpochEndMeasurement`);
- ``code``: a content hash of the framework's Python files (:data:`CODE`); the README, tests,
  benchmarks and YAML files are not in it (the YAML's effect is already in the resolved config).

A re-run compares its identity with the record's (:func:`changes`) before it trains, resumes or
reports a finished job.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from callbacks.epoch_measurement import EpochEndMeasurement

ROOT = Path(__file__).resolve().parents[1]
CODE = ("measures", "lightning_modules", "callbacks", "lifecycle", "train.py")
"""The framework's code whose content identifies a result."""

NOT_TRAINING = (
    "logger",
    "paths",
    "hydra",
    "fresh",
    "accept_code_change",
    "threads",
    "fault",
    "experiment_name",
    "data.num_workers",
    "data.on_device",
    "data.data_dir",
    "data.download",
    "data.eval_batch_size",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.checkpoint",
    "callbacks.checkpoint_last",
    "callbacks.checkpoint_interval",
)
"""Config keys (and their subtrees) that do not change what is trained."""


def code_hash() -> str:
    """sha256 over the path and content of every ``*.py`` file of :data:`CODE`, in path order."""
    files = []
    for name in CODE:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _is_measurement(callback_cfg) -> bool:
    target = callback_cfg.get("_target_") if isinstance(callback_cfg, dict) else None
    if not target:
        return False
    try:
        cls = hydra.utils.get_class(target)
    except Exception:  # an unknown target fails later, as a config error
        return False
    return isinstance(cls, type) and issubclass(cls, EpochEndMeasurement)


def identity(cfg: DictConfig) -> dict:
    """``{"training": {...}, "measurement": {...}, "code": hash}`` of the job ``cfg`` describes."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    measurement_cbs = {
        name for name, c in (tree.get("callbacks") or {}).items() if c is not None and _is_measurement(c)
    }
    training, measurement = {}, {}
    for key, value in _flatten(tree).items():
        if any(key == k or key.startswith(k + ".") for k in NOT_TRAINING):
            continue
        parts = key.split(".")
        if parts[0] == "callbacks" and len(parts) > 1 and parts[1] in measurement_cbs:
            measurement[key] = value
        else:
            training[key] = value
    return {"training": training, "measurement": measurement, "code": code_hash()}


def changes(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (added or removed keys included)."""
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(
                f"{key}: {'(unset)' if a is missing else repr(a)} -> {'(unset)' if b is missing else repr(b)}"
            )
    return out


def provenance() -> dict:
    """Where a result came from: the code's commit, library versions, machine."""
    import pytorch_lightning as pl
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
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
