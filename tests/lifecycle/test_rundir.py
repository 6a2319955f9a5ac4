"""Run directory names: injective, one path component, inside the log directory; old names kept."""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path
from urllib.parse import unquote

import pytest
from omegaconf import OmegaConf

from lifecycle.job import run_job
from lifecycle.rundir import RunDirError, check_inside, job_dirname, safe_name

LONG = "a=" + "x" * 150
TRICKY = [
    "+note=a/b", "+note=a_b", "+note=a%2Fb", "+note=a%252Fb", "+note=a b", "+note=a:b", "+note=a\\b",
    "..", ".", "../x", ".hidden=1", "default", "%64efault", "~callbacks.hessian", "_callbacks.hessian",
    "x=[0,0.1]", "x=_0,0.1_", "x=é", "x=e\u0301", "x=日本", "x=\U0001f600", "x=\udcff", "x=\x00",
    LONG + "1", LONG + "2", LONG + "/", LONG + "_", "a=" + "/" * 150, "a=" + "_" * 150,
    "+tag=x-0123456789", "+tag=x%2D0123456789",
]  # fmt: skip


def _is_component(name: str) -> bool:
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


def test_job_dirname_is_injective_on_tricky_pairs():
    names = {s: job_dirname(s) for s in ["", *TRICKY]}
    for (a, na), (b, nb) in combinations(names.items(), 2):
        assert na != nb, (a, b, na)
    assert job_dirname("+note=a/b") == "+note=a%2Fb" and job_dirname("+note=a_b") == "+note=a_b"
    assert job_dirname("+note=a%2Fb") == "+note=a%252Fb"  # % itself is encoded


@pytest.mark.parametrize("overrides", TRICKY)
def test_job_dirname_is_one_readable_path_component(overrides):
    name = job_dirname(overrides)
    assert _is_component(name) and name.isascii() and len(name) <= 122
    assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789=,._+-%")
    if len(overrides) < 100:  # not shortened: the encoding is reversible, hence injective
        assert unquote(name, errors="surrogatepass") == overrides


def test_ordinary_names_are_unchanged_and_long_ones_hashed_as_before():
    assert job_dirname("") == "default"
    for ordinary in ["optimizer.lr=0.01,trainer.max_epochs=2", "model=mlp", "optimizer.batch_size=64,seed=1",
                     "adversarial_training.enabled=false,experiment=robust,optimizer.batch_size=4096,"
                     "optimizer.momentum=0.9,seed=0"]:  # fmt: skip
        assert job_dirname(ordinary) == ordinary
    long = (
        "adversarial_training.enabled=true,experiment=robust_small,optimizer.batch_size=4096,"
        "optimizer.momentum=0.9,seed=2,trainer.max_epochs=3"
    )
    # the name the previous implementation gave, so existing run directories are found again
    assert job_dirname(long) == long[:100] + "-85a4d01d9c"
    assert job_dirname("~callbacks.hessian") == "%7Ecallbacks.hessian"
    assert job_dirname("x=[0,0.1]") == "x=%5B0,0.1%5D"


def test_long_names_differing_only_at_the_end_stay_apart_and_escapes_are_not_split():
    a, b = job_dirname(LONG + "1"), job_dirname(LONG + "2")
    assert a != b and a[:100] == b[:100] and len(a) == len(b) == 111
    slashes = job_dirname("a=" + "/" * 150)
    prefix = slashes.rsplit("-", 1)[0]
    assert prefix.endswith("%2F") and unquote(prefix) == "a=" + "/" * ((len(prefix) - 2) // 3)


def test_a_short_name_never_looks_like_a_shortened_one():
    long_name = job_dirname(LONG)
    assert job_dirname(long_name) != long_name  # an override spelled like a hashed name
    assert job_dirname(long_name).endswith("%2D" + long_name[-10:])


def test_safe_name_maps_experiment_names_to_one_component():
    assert safe_name("fixed_lr_small") == "fixed_lr_small"
    assert safe_name("../../x") == "%2E.%2F..%2Fx"
    names = [
        safe_name(s) for s in ["../../x", "..", ".", "a/b", "a_b", "a%2Fb", "/etc", "x\x00", "日本", LONG]
    ]
    assert all(_is_component(n) for n in names) and len(set(names)) == len(names)
    for bad in ["", None]:
        with pytest.raises(RunDirError, match="experiment_name"):
            safe_name(bad)


def test_composed_sweep_and_run_dirs_lie_inside_the_log_dir(compose, tmp_path):
    log_dir = tmp_path / "logs"
    cfg = compose(["experiment_name=../../x", "+note=../../../y", f"paths.log_dir={log_dir}"])
    sweep = Path(cfg.hydra.sweep.dir)
    assert sweep == log_dir / "sweeps" / "%2E.%2F..%2Fx"
    assert cfg.experiment_name == "../../x"  # the name itself (W&B group, record) is kept as given
    run = Path(cfg.hydra.run.dir)
    assert run.parent == log_dir / "runs" and "%2F" in run.name
    for d in (sweep, run, sweep / cfg.hydra.sweep.subdir):
        assert log_dir in Path(os.path.abspath(d)).parents


def test_check_inside(tmp_path):
    log_dir = tmp_path / "logs"
    assert check_inside(log_dir / "runs" / "x", log_dir) == log_dir / "runs" / "x"
    for outside in [
        tmp_path / "x",
        log_dir,
        log_dir / "sweeps" / ".." / ".." / "x",
        tmp_path / "logs2" / "x",
    ]:
        with pytest.raises(RunDirError, match="not inside the log directory"):
            check_inside(outside, log_dir)


def test_run_job_refuses_a_directory_outside_the_log_dir_before_writing(compose, tmp_path, capsys):
    cfg = compose([f"paths.log_dir={tmp_path / 'logs'}"])
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    outside = tmp_path / "elsewhere" / "job"
    outcome = run_job(task_cfg, outside)
    assert outcome.exit_code == 2 and outcome.out_dir == outside and not (tmp_path / "elsewhere").exists()
    assert "not inside the log directory" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
