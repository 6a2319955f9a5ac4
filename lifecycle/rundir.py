"""Run identity on disk: a job's directory is a function of its overrides.

So two different jobs never share a directory (even when started in the same second) and the
same command finds its own directory again: that is how an interrupted run or sweep resumes.
The Hydra config (``conf/hydra/default.yaml``) names directories with the ``job_dirname``
resolver, registered by :func:`register_resolvers` (the entry points call it before Hydra
composes the config).
"""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def job_dirname(overrides: str) -> str:
    """Directory name of a job from its override string: readable, filesystem-safe, unique."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]
    return name


def register_resolvers() -> None:
    """Make ``${job_dirname:...}`` available to Hydra configs (idempotent)."""
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
