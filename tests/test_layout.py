"""The layout's import rules, read from the source with ``ast`` (nothing is imported to check them).

Imports point one way: measures <- lightning_modules <- callbacks <- lifecycle <- reporting <- entry
points (train.py, measure.py, report.py, wandb_sync.py). ``measures`` is pure torch; ``callbacks`` holds
only Lightning callbacks; ``reporting`` reads records without torch or Lightning; nothing imports ``train``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytorch_lightning as pl

from tests.helpers import ROOT

LAYERS = ["measures", "lightning_modules", "callbacks", "lifecycle", "reporting"]
ENTRY_POINTS = ["train", "measure", "report", "wandb_sync"]
FRAMEWORKS = {"pytorch_lightning", "lightning", "hydra", "omegaconf", "wandb"}


def python_files() -> list[Path]:
    skip = {".venv", ".git", "outputs", "multirun", "wandb", "data"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (``from a.b import c`` -> ``a``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imports_of(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imported_modules(p) for p in sorted((ROOT / package).rglob("*.py"))}


def test_the_walker_sees_imports_so_the_rules_below_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import wandb\nfrom hydra.utils import instantiate\nfrom . import x\nimport torch.nn as nn\n"
    )
    assert imported_modules(f) == {"wandb", "hydra", "torch"}
    assert imports_of("measures") and imports_of("callbacks")


def test_measures_is_pure_torch():
    offenders = {f: sorted(m & FRAMEWORKS) for f, m in imports_of("measures").items() if m & FRAMEWORKS}
    assert offenders == {}, f"measures/ must not import {sorted(FRAMEWORKS)}: {offenders}"


def test_each_layer_imports_only_the_layers_below_it():
    offenders = {}
    for i, layer in enumerate(LAYERS):
        above = set(LAYERS[i + 1 :]) | set(ENTRY_POINTS)
        for f, modules in imports_of(layer).items():
            if modules & above:
                offenders[f] = sorted(modules & above)
    assert offenders == {}, f"imports that point up the layers: {offenders}"


def test_reporting_reads_records_without_torch_lightning_or_the_training_code():
    heavy = {"torch", "pytorch_lightning", "lightning", "measures", "callbacks", "lightning_modules"}
    offenders = {f: sorted(m & heavy) for f, m in imports_of("reporting").items() if m & heavy}
    assert offenders == {}, f"reporting/ must not import {sorted(heavy)}: {offenders}"


def test_nothing_imports_train():
    offenders = [str(p.relative_to(ROOT)) for p in python_files() if "train" in imported_modules(p)]
    assert offenders == []


def test_callbacks_defines_only_lightning_callbacks():
    found = []
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        module = importlib.import_module(f"callbacks.{path.stem}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__:
                found.append(name)
                assert issubclass(obj, pl.Callback), f"callbacks/{path.name}: {name} is not a pl.Callback"
                assert obj.__doc__ and "Args:" in obj.__doc__, (
                    f"{name} needs a docstring listing its arguments"
                )
    assert {"EpochEndMeasurement", "HessianSpectrum", "AdversarialAccuracy", "TrainingTarget"} <= set(found)
