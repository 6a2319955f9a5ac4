"""The job lifecycle in-process: its test tools, its outcomes and the refusals that need no training."""

from __future__ import annotations

import pytest

from callbacks.fault_injection import FaultInjection
from lifecycle.build import validate
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


def test_an_unknown_setting_is_named_with_the_allowed_ones(compose):
    with pytest.raises(ConfigError) as e:
        validate(compose(["+optimizer.lrr=0.1"]), multirun=False)
    assert "optimizer.lrr=0.1 is invalid: not a setting of optimizer (allowed: batch_size, lr," in str(
        e.value
    )


@pytest.mark.parametrize(
    "override,named",
    [
        ("optimizer.weight_decay=abc", "optimizer.weight_decay='abc' is invalid: must be a number"),
        ("optimizer.gamma=abc", "optimizer.gamma='abc' is invalid: must be a number"),
        ("optimizer.nesterov=abc", "optimizer.nesterov='abc' is invalid: must be true or false"),
        ("adversarial_training.enabled=abc", "adversarial_training.enabled='abc' is invalid"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(compose, override, named):
    with pytest.raises(ConfigError) as e:
        validate(compose([override]), multirun=False)
    assert named in str(e.value)


def test_no_epoch_cap_without_a_step_budget_is_refused(compose):
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-1 is invalid: .*max_steps > 0"):
        validate(compose(["trainer.max_epochs=-1"]), multirun=False)
    validate(compose(["trainer.max_epochs=-1", "trainer.max_steps=10"]), multirun=False)
