"""The job lifecycle in-process: its test tools, its outcomes and the refusals that need no training."""

from __future__ import annotations

import pytest

from callbacks.fault_injection import FaultInjection
from lifecycle.identity import identity
from lifecycle.rundir import job_dirname
from lightning_modules.config import ConfigError


def test_fault_is_a_config_key_outside_the_jobs_identity_and_directory_name(compose):
    plain, faulted = compose(["optimizer.lr=0.02"]), compose(["optimizer.lr=0.02", "fault=SIGTERM@batch:5"])
    assert plain.fault is None and faulted.fault == "SIGTERM@batch:5"
    assert identity(plain)["training"] == identity(faulted)["training"]
    assert job_dirname(plain.hydra.job.override_dirname) == job_dirname(faulted.hydra.job.override_dirname)
    fault = FaultInjection.parse(faulted.fault)
    assert (fault.action, fault.kind, fault.step) == ("SIGTERM", "batch", 5)
    with pytest.raises(ConfigError, match="point"):
        FaultInjection.parse("SIGTERM@batch:x")
