"""Shared test fixtures: config composition and running train.py as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")  # tests never touch the network
# Small, fast runs: no measurement callbacks unless a test asks for them.
FAST = ["logger=none", "trainer.enable_progress_bar=false"]


def run_train(
    args: list[str], log_dir: Path, *, env: dict | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` with runs written under ``log_dir``; output captured."""
    full_env = {**os.environ, "SGD_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}\n{tail}")
    return proc


def records(log_dir: Path) -> dict[str, dict]:
    """results.json of every job under ``log_dir``, keyed by the job directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(log_dir).rglob("results.json"))}


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> the config train.py would see (Hydra's runtime dir set to tmp)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import train  # noqa: F401  (registers the job_dirname resolver)

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides or [], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "job")
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
