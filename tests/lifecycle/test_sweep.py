"""lifecycle/sweep.py: a sweep's expected jobs and a job's identity, read by Hydra's override parser."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lifecycle import sweep
from lifecycle.sweep import (
    Grid,
    SweepError,
    expand,
    grid_from_config,
    hydra_internals,
    job_key,
    parse,
    read_grid,
)
from tests.helpers import ROOT


def test_numbers_are_compared_by_value():
    assert job_key(["optimizer.lr=1e6"]) == job_key(["optimizer.lr=1000000.0"])
    assert job_key(["optimizer.lr=0.010"]) == job_key(["optimizer.lr=1e-2"])
    assert job_key(["optimizer.batch_size=128"]) == job_key(["optimizer.batch_size=128.0"])
    assert job_key(["optimizer.lr=1e6"]) != job_key(["optimizer.lr=1e5"])
    assert job_key(["optimizer.lr=1e6"]) != job_key(["optimizer.lr='1e6'"])  # a quoted string is a string
    assert job_key(["fresh=true"]) == job_key(["fresh=True"]) != job_key(["fresh=1"])


def test_a_key_is_the_override_set_without_the_excluded_keys():
    a = ["seed=0", "optimizer.lr=0.01", "threads=1", "logger=none"]
    b = ["optimizer.lr=0.01", "seed=0", "threads=4"]
    assert job_key(a, exclude_keys=["threads", "logger"]) == job_key(b, exclude_keys=["threads", "logger"])
    assert job_key(a) != job_key(b)


def test_lists_quoted_strings_deletions_and_additions():
    assert job_key(["callbacks.adversarial.eps=[0,0.1]"]) == job_key(
        ["callbacks.adversarial.eps=[0.0, 1e-1]"]
    )
    assert job_key(["callbacks.adversarial.eps=[0,0.1]"]) != job_key(["callbacks.adversarial.eps=[0,0.2]"])
    assert job_key(["name='a,b'"]) == job_key(['name="a,b"']) == job_key([r"name=a\,b"])
    # what the user types and what Hydra hands the job
    assert job_key(["~callbacks.hessian"]) == job_key(["~callbacks.hessian=null"])
    assert job_key(["~callbacks.hessian"]) != job_key(["callbacks.hessian=null"])  # delete != set to null
    assert job_key(["+extra.x=1"]) != job_key(["extra.x=1"])
    assert job_key(["+extra.x=1"]) == job_key(["+extra.x=1.0"])


def test_expansion_is_the_basic_sweepers():
    lines = [
        "optimizer.lr=1e6,0.01",
        "seed=range(0,3)",
        "optimizer.momentum=choice(0,0.9)",
        "callbacks.adversarial.eps=[0,0.1]",
        "name='a,b'",
        "~callbacks.hessian",
        "+extra.tag=x,y",
        "optimizer.batch_size=32,64",
        "optimizer.batch_size=128",  # a later value of one key replaces the earlier one
    ]
    jobs = expand(lines)
    assert (
        jobs == hydra_internals().split_arguments(parse(lines), None)[0]
    )  # Hydra's own list, string for string
    assert len(jobs) == 2 * 3 * 2 * 2
    assert {j[0] for j in jobs} == {"optimizer.lr=1000000.0", "optimizer.lr=0.01"}
    assert {j[1] for j in jobs} == {"seed=0", "seed=1", "seed=2"}
    assert all("optimizer.batch_size=128" in j and "name='a,b'" in j for j in jobs)
    assert all("callbacks.adversarial.eps=[0,0.1]" in j and "~callbacks.hessian=null" in j for j in jobs)


def test_a_list_valued_sweep_is_one_value_per_list():
    jobs = expand(["callbacks.adversarial.eps=[0,0.1],[0.2]"])
    assert [job_key(j) for j in jobs] == [
        job_key(["callbacks.adversarial.eps=[0,0.1]"]),
        job_key(["callbacks.adversarial.eps=[0.2]"]),
    ]


def test_sweeps_without_a_finite_grid_or_bad_syntax_raise():
    with pytest.raises(SweepError, match="INTERVAL"):
        expand(["optimizer.lr=interval(0,1)"])
    with pytest.raises(SweepError, match="cannot parse"):
        job_key(["optimizer.lr=[0,"])
    with pytest.raises(SweepError, match="a sweep"):
        job_key(["optimizer.lr=1,2"])  # one job's overrides hold no sweep


def multirun(params=None, task=(), exclude=("threads",), **extra) -> dict:
    return {
        "hydra": {
            "sweeper": {
                "_target_": hydra_internals().basic_sweeper,
                "params": params,
            },
            "overrides": {"task": list(task)},
            "job": {"config": {"override_dirname": {"exclude_keys": list(exclude)}}},
            **extra,
        }
    }


def test_grid_from_a_saved_multirun_yaml_matches_what_the_jobs_record(tmp_path):
    cfg = multirun(
        params={"optimizer.batch_size": "32,128", "optimizer.momentum": "0,0.9", "seed": 0},
        task=["experiment=x", "optimizer.lr=1e6,0.01", "optimizer.momentum=0.9", "threads=1"],
    )
    path = tmp_path / "multirun.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    grid = read_grid(path)
    assert len(grid.jobs) == 2 * 2  # the command line's momentum replaced the config's 0,0.9
    recorded = ["optimizer.batch_size=128", "optimizer.momentum=0.9", "seed=0", "experiment=x",
                "optimizer.lr=1000000.0", "threads=2"]  # fmt: skip
    assert grid.key(recorded) in grid.keys()
    assert grid.key([*recorded[:-2], "optimizer.lr=0.001"]) not in grid.keys()
    assert grid.axes() == {"optimizer.batch_size", "optimizer.lr"}
    assert grid.describe(grid.jobs[0]) == "optimizer.batch_size=32,optimizer.lr=1000000.0"
    assert (
        Grid((("seed=0", "threads=1"),), frozenset({"threads"})).describe(("seed=0", "threads=1")) == "seed=0"
    )


def test_glob_sweeps_list_the_recorded_config_sources_and_other_sweepers_are_unknown():
    sources = [
        {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
        {"path": str(ROOT / "conf"), "schema": "file", "provider": "main"},
    ]
    cfg = multirun(task=["model=glob([mlp,lenet])", "seed=0"], runtime={"config_sources": sources})
    assert sorted(grid_from_config(cfg).jobs) == [("model=lenet", "seed=0"), ("model=mlp", "seed=0")]
    sources[1]["path"] = "/nonexistent"  # the sweep was made on another machine
    with pytest.raises(SweepError, match="no value"):
        grid_from_config(cfg)
    cfg = multirun(task=["seed=0"])
    cfg["hydra"]["sweeper"]["_target_"] = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    with pytest.raises(SweepError, match="only the basic sweeper"):
        grid_from_config(cfg)


def test_an_unreadable_multirun_yaml_raises_a_sweep_error(tmp_path):
    path = tmp_path / "multirun.yaml"
    path.write_text("hydra:\n  sweeper: [unclosed\n")
    with pytest.raises(SweepError, match="cannot read"):
        read_grid(path)


def test_hydras_private_api_is_what_hydra_internals_expects():
    """Fails loudly, naming the private name and Hydra's version, when a Hydra release changes it."""
    sweep.hydra_internals.cache_clear()
    try:
        internals = hydra_internals()
    except sweep.HydraInternalsChanged as e:
        pytest.fail(str(e))
    assert internals.basic_sweeper == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert internals.basic_launcher == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    # and what it hands out works: a loader over this project's configs lists a group's options
    from hydra.core.plugins import Plugins

    Plugins.instance()
    path = internals.search_path()
    path.append(provider="main", path=f"file://{ROOT / 'conf'}")
    loader = internals.config_loader(config_search_path=path)
    assert "mlp" in loader.get_group_options("model")


def test_a_changed_private_api_is_named_with_hydras_version(monkeypatch):
    import hydra
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweep.hydra_internals.cache_clear()
    monkeypatch.delattr(BasicSweeper, "split_arguments")
    with pytest.raises(
        sweep.HydraInternalsChanged, match=rf"Hydra {hydra.__version__} changed .*split_arguments"
    ):
        hydra_internals()
    sweep.hydra_internals.cache_clear()
