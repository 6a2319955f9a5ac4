"""Shared fixtures: the config train.py would compose. Helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os

import pytest

from lifecycle.rundir import register_resolvers
from tests.helpers import ROOT

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never touch the network
register_resolvers()  # the run-directory resolver, as train.py registers it


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> the config train.py would see (Hydra's runtime dir set to tmp)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

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
