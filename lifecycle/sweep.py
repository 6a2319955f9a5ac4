"""Which jobs a sweep directory expects, and which overrides identify a job.

Hydra's basic sweeper saves the sweep's composed config as ``<sweep dir>/multirun.yaml`` before
the first job starts, then hands every job the override list of one grid point (the job's
``results.json`` keeps it as ``overrides``). The grid is the product of the sweeper's
``params`` (from the config) and the command line's overrides, a later value of one key
replacing an earlier one, exactly as ``BasicSweeper.split_arguments`` builds it.

Everything here goes through Hydra's own override parser, so values are compared as values:
``optimizer.lr=1e6`` on the command line is the job recorded as ``optimizer.lr=1000000.0``;
``choice()``, ``range()``, quoted strings, lists, dicts, ``~key`` and ``+key=v`` are read as
Hydra reads them. Keys in ``hydra.job.config.override_dirname.exclude_keys`` (``threads``,
``logger``, ...) do not change what is trained and are not part of a job's identity.

- :func:`read_grid`: a ``multirun.yaml`` into the expected jobs (:class:`Grid`);
- :func:`expand`: command-line style overrides into one override list per job;
- :func:`job_key`: the identity of a job's override list (compare keys, not strings);
- :func:`describe`: a job's overrides as one readable line;
- :func:`hydra_internals`: the one place that touches Hydra's private API (``hydra._internal``).

Pure functions: nothing here runs a job or writes a file.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra as hydra_pkg
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import OmegaConf

MULTIRUN = "multirun.yaml"

JobKey = frozenset[tuple[str, str]]
"""A job's identity: ``{(key with its ~/+ prefix and @package, canonical value)}``."""


class SweepError(ValueError):
    """The overrides cannot be read, or the grid cannot be enumerated (its expected jobs are unknown)."""


class HydraInternalsChanged(RuntimeError):
    """Hydra's private API is not what :func:`hydra_internals` was written against (hydra-core 1.3.8)."""


@dataclass(frozen=True)
class HydraInternals:
    """What this project takes from Hydra's private API, and nothing else.

    Attributes:
        basic_sweeper: the ``_target_`` Hydra records for its basic sweeper (its grid is the one we know).
        basic_launcher: the ``_target_`` of the launcher that runs jobs one after another, in order.
        config_loader: ``ConfigLoaderImpl``, called as ``config_loader(config_search_path=...)``.
        search_path: ``ConfigSearchPathImpl``, called as ``search_path()`` then ``.append(provider=, path=)``.
        split_arguments: ``BasicSweeper.split_arguments(overrides, max_batch_size)``: Hydra's own grid.
    """

    basic_sweeper: str
    basic_launcher: str
    config_loader: Any
    search_path: Any
    split_arguments: Any


@functools.cache
def hydra_internals() -> HydraInternals:
    """Every use of Hydra's private API (``hydra._internal``) goes through here.

    Hydra has no public way to name its default sweeper and launcher, nor to build a config loader
    over a finished sweep's recorded config sources (to expand ``glob()`` the way the sweep did), so
    we take them from ``hydra._internal``, which may change in any Hydra release. Everything taken
    is checked here, once, so a Hydra that changed it fails with :class:`HydraInternalsChanged`
    naming the private name and the installed Hydra version, instead of a wrong grid later on
    (``tests/lifecycle/test_sweep.py`` calls this).
    """

    def changed(what: str, detail: str) -> HydraInternalsChanged:
        return HydraInternalsChanged(
            f"Hydra {hydra_pkg.__version__} changed its private API {what} ({detail}); "
            "lifecycle.sweep.hydra_internals was written against hydra-core 1.3.8: adapt it, or install "
            "hydra-core==1.3.8."
        )

    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    except ImportError as e:
        raise changed(f"hydra._internal ({e.name})", str(e)) from e
    expected = {
        "ConfigLoaderImpl.__init__": (ConfigLoaderImpl.__init__, {"config_search_path"}),
        "ConfigSearchPathImpl.append": (getattr(ConfigSearchPathImpl, "append", None), {"provider", "path"}),
        "BasicSweeper.split_arguments": (
            getattr(BasicSweeper, "split_arguments", None),
            {"overrides", "max_batch_size"},
        ),
    }
    for name, (fn, params) in expected.items():
        if fn is None:
            raise changed(f"hydra._internal: {name}", "it is gone")
        missing = params - set(inspect.signature(fn).parameters)
        if missing:
            raise changed(f"hydra._internal: {name}", f"it has no parameter {', '.join(sorted(missing))}")
    return HydraInternals(
        basic_sweeper=f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}",
        basic_launcher=f"{BasicLauncher.__module__}.{BasicLauncher.__qualname__}",
        config_loader=ConfigLoaderImpl,
        search_path=ConfigSearchPathImpl,
        split_arguments=BasicSweeper.split_arguments,
    )


@functools.cache
def _plain_parser() -> OverridesParser:
    return OverridesParser.create()


def _parser(config_loader: Any = None) -> OverridesParser:
    return _plain_parser() if config_loader is None else OverridesParser.create(config_loader=config_loader)


def parse(overrides: Iterable[str], config_loader: Any = None) -> list[Override]:
    """Hydra's parse of override strings (``key=value``, ``~key``, ``+key=value``, sweeps)."""
    lines = [str(o) for o in overrides]
    try:
        return _parser(config_loader).parse_overrides(lines)
    except HydraException as e:
        raise SweepError(f"cannot parse overrides {lines}: {e}") from e


def _normal(value: Any) -> Any:
    """A value as a JSON-able canonical form: numbers as floats (1 == 1.0), containers recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return str(value)


def _canonical(override: Override) -> tuple[str, str]:
    if override.is_sweep_override():
        raise SweepError(f"{override.input_line}: a sweep, not one job's value")
    return override.get_key_element(), json.dumps(_normal(override.value()), sort_keys=True)


def job_key(overrides: Iterable[str], exclude_keys: Iterable[str] = ()) -> JobKey:
    """The identity of one job's override list, by value; ``exclude_keys`` are left out.

    ``["optimizer.lr=1e6", "seed=0"]`` and ``["seed=0", "optimizer.lr=1000000.0"]`` have the same
    key; ``~callbacks.hessian`` and ``~callbacks.hessian=null`` too (what Hydra hands the job).
    """
    exclude = set(exclude_keys)
    return frozenset(_canonical(o) for o in parse(overrides) if o.key_or_group not in exclude)


def expand(overrides: Sequence[str], config_loader: Any = None) -> list[list[str]]:
    """The jobs of a sweep: one override list per grid point, as Hydra's basic sweeper makes them.

    A discrete sweep (``a,b``, ``choice()``, ``range()``, ``glob()`` given a config loader)
    contributes one value per job; a later override of the same key replaces an earlier one.
    Interval sweeps (``interval()``) have no finite grid: :class:`SweepError`.
    """
    axes: dict[str, list[str]] = {}
    for override in parse(overrides, config_loader):
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
            continue
        if not override.is_discrete_sweep():
            raise SweepError(f"{override.input_line}: a {override.value_type.name} sweep has no finite grid")
        try:
            values = list(override.sweep_string_iterator())
        except HydraException as e:
            raise SweepError(f"{override.input_line}: cannot enumerate ({e})") from e
        if not values:
            raise SweepError(f"{override.input_line}: the sweep expands to no value")
        axes[key] = [f"{key}={v}" for v in values]
    return [list(job) for job in itertools.product(*axes.values())]


@dataclass(frozen=True)
class Grid:
    """The jobs a sweep expects.

    Attributes:
        jobs: each job's overrides, as Hydra hands them to the job.
        exclude_keys: keys that are not part of a job's identity.
    """

    jobs: tuple[tuple[str, ...], ...]
    exclude_keys: frozenset[str] = frozenset()

    def key(self, overrides: Iterable[str]) -> JobKey:
        return job_key(overrides, self.exclude_keys)

    def keys(self) -> list[JobKey]:
        """The jobs' keys, in the order of :attr:`jobs`."""
        return list(self._keys)

    def axes(self) -> set[str]:
        """The keys (as in :data:`JobKey`) whose value differs between jobs."""
        return set(self._axes)

    def describe(self, job: Sequence[str]) -> str:
        """A job as ``key=value,...`` over the grid's axes (all its identifying overrides if none)."""
        kept = [o for o in parse(job) if o.key_or_group not in self.exclude_keys]
        shown = [o for o in kept if o.get_key_element() in self._axes] or kept
        return describe(o.input_line for o in shown)

    @functools.cached_property
    def _keys(self) -> tuple[JobKey, ...]:
        return tuple(self.key(job) for job in self.jobs)

    @functools.cached_property
    def _axes(self) -> frozenset[str]:
        values: dict[str, set[str]] = {}
        for key in self._keys:
            for k, v in key:
                values.setdefault(k, set()).add(v)
        return frozenset(k for k, vs in values.items() if len(vs) > 1)


def describe(overrides: Iterable[str]) -> str:
    """Override strings as one sorted, readable line."""
    return ",".join(sorted(str(o) for o in overrides))


def grid_from_config(multirun: Mapping) -> Grid:
    """The expected jobs from a sweep's composed config (the contents of ``multirun.yaml``)."""
    hydra = multirun.get("hydra") or {}
    basic = hydra_internals().basic_sweeper
    target = (hydra.get("sweeper") or {}).get("_target_", basic)
    if target != basic:
        raise SweepError(f"sweeper {target}: only the basic sweeper's grid is known")
    dirname = ((hydra.get("job") or {}).get("config") or {}).get("override_dirname") or {}
    exclude = frozenset(dirname.get("exclude_keys") or [])
    params = [f"{k}={v}" for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
    task = list((hydra.get("overrides") or {}).get("task") or [])
    lines = [*params, *task]
    loader = _config_loader(hydra) if any("glob(" in line for line in lines) else None
    return Grid(tuple(tuple(job) for job in expand(lines, loader)), exclude)


def read_grid(path: str | Path) -> Grid:
    """The expected jobs of the sweep whose ``multirun.yaml`` is at ``path``."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # a truncated or hand-edited file
        raise SweepError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, Mapping):
        raise SweepError(f"{path} is not a mapping")
    return grid_from_config(cfg)


def _config_loader(hydra: Mapping) -> Any:
    """Hydra's config loader over the sweep's recorded config sources (lists a group's options for glob())."""
    from hydra.core.plugins import Plugins

    internals = hydra_internals()
    Plugins.instance()  # registers the config source types (file://, pkg://, structured://)
    search_path = internals.search_path()
    for source in (hydra.get("runtime") or {}).get("config_sources") or []:
        search_path.append(provider=source["provider"], path=f"{source['schema']}://{source['path']}")
    try:
        return internals.config_loader(config_search_path=search_path)
    except Exception as e:
        raise SweepError(f"cannot read the sweep's config sources to expand glob(): {e}") from e
