"""One home for defaults: the Python signatures are the source, the YAML lists them.

Every setting a config group option lists must equal the default of the constructor (or
dataclass) it is passed to, so a callback, model, datamodule or optimizer built in Python gets
the numbers a run built from the YAML gets. Compared (composed with Hydra, as train.py does):

- ``callbacks/*``: every entry whose ``_target_`` is this project's code (Lightning's own
  ``ModelCheckpoint`` is set deliberately: its directory, file names and monitor);
- ``model/*``: every option (each is its own constructor);
- ``optimizer``: the base option ``sgd`` only (``paper_b`` is a recipe that changes the schedule);
- ``data``: the base option ``mnist5k`` only (each other option sets its dataset's own values);
- ``adversarial_training`` in ``train.yaml``.

Not compared: ``trainer/*`` and ``logger/*`` (their targets are Lightning's classes, which the
YAML configures on purpose). Values that are interpolations (``${paths.output_dir}``) have no
default to compare against.
"""

from __future__ import annotations

import inspect
import shutil

import hydra
import pytest
from omegaconf import OmegaConf

from lightning_modules.config import AdversarialTraining, SGDConfig
from tests.helpers import ROOT

OURS = ("callbacks.", "lightning_modules.", "lifecycle.", "measures.")


def _plain(v):
    """Lists and tuples alike (YAML has no tuple), floats and ints by value."""
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def mismatches(where: str, target, values: dict) -> list[str]:
    """One line per key of ``values`` that the signature of ``target`` lacks or defaults otherwise."""
    params = inspect.signature(target).parameters
    out = []
    for key, value in values.items():
        if key == "_target_" or (isinstance(value, str) and value.startswith("${")):
            continue
        name = f"{where}.{key}"
        if key not in params:
            out.append(f"{name}: not an argument of {target.__qualname__}")
        elif params[key].default is inspect.Parameter.empty:
            out.append(f"{name}: {target.__qualname__} has no default for it (YAML: {value!r})")
        elif _plain(params[key].default) != _plain(value):
            out.append(f"{name}: YAML {value!r} != {target.__qualname__}'s default {params[key].default!r}")
    return out


def _raw(node) -> dict:
    return OmegaConf.to_container(node, resolve=False)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("callbacks"))
def test_every_callback_yaml_equals_its_constructor_defaults(compose, option):
    cfg = compose([f"callbacks={option}"])
    bad = []
    for name, node in (_raw(cfg.callbacks) or {}).items():
        target = node.get("_target_", "")
        if target.startswith(OURS):
            bad += mismatches(f"callbacks.{name}", hydra.utils.get_object(target), node)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_yaml_equals_its_constructor_defaults(compose, option):
    node = _raw(compose([f"model={option}"]).model)
    bad = mismatches("model", hydra.utils.get_object(node["_target_"]), node)
    assert not bad, "\n".join(bad)


def test_base_optimizer_data_and_adversarial_training_equal_their_defaults(compose):
    cfg = compose(["optimizer=sgd", "data=mnist5k"])
    data = _raw(cfg.data)
    bad = mismatches("optimizer", SGDConfig, _raw(cfg.optimizer))
    bad += mismatches("data", hydra.utils.get_object(data["_target_"]), data)
    bad += mismatches("adversarial_training", AdversarialTraining, _raw(cfg.adversarial_training))
    assert not bad, "\n".join(bad)


def test_the_comparison_names_a_key_that_differs():
    def make(k: int = 3, tol: float = 1e-4, steps=(1, 2)):
        return k, tol, steps

    assert mismatches("callbacks.x", make, {"_target_": "x", "k": 3, "tol": 1e-4, "steps": [1, 2]}) == []
    (line,) = mismatches("callbacks.x", make, {"k": 5})
    assert line.startswith("callbacks.x.k: YAML 5 != ")
    (line,) = mismatches("callbacks.x", make, {"kk": 5})
    assert "callbacks.x.kk: not an argument" in line


def test_a_users_callback_is_added_with_a_list_of_callback_configs(tmp_path):
    """The form conf/callbacks/default.yaml's comment gives, ``'callbacks=[default,my_callback]'``,
    keeps the default callbacks and adds the user's; ``+callbacks=my_callback`` is refused."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "callbacks" / "my_callback.yaml").write_text(
        "my_callback:\n  _target_: tests.integration.user_callback.WeightNorm\n  every_n_epochs: 1\n"
    )
    assert "'callbacks=[default,my_callback]'" in (conf / "callbacks" / "default.yaml").read_text()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = hydra_compose("train", overrides=["callbacks=[default,my_callback]"])
            with pytest.raises(ConfigCompositionException, match="Multiple values for callbacks"):
                hydra_compose("train", overrides=["+callbacks=my_callback"])
    finally:
        GlobalHydra.instance().clear()
    assert list(cfg.callbacks) == [
        "checkpoint_last",
        "checkpoint",
        "checkpoint_interval",
        "training_target",
        "hessian",
        "adversarial",
        "my_callback",
    ]
    assert cfg.callbacks.my_callback._target_.endswith("WeightNorm")
