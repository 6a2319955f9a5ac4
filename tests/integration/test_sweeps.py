"""The study as sweeps: real `python train.py -m` subprocesses, resume, divergence, launchers, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from omegaconf import OmegaConf

import report
from lifecycle.build import validate
from lightning_modules.config import ConfigError
from tests.helpers import NO_MEASURE, ROOT, records, run_train

pytestmark = pytest.mark.slow

SMALL = [
    "experiment=fixed_lr_small", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
    "callbacks.hessian.subset_size=200", "callbacks.hessian.k=2", "callbacks.adversarial.subset_size=100",
    "callbacks.adversarial.eps=[0,0.1]", "callbacks.adversarial.pgd_steps=3", "threads=1", "optimizer.momentum=0.9",
]  # fmt: skip


def test_grid_interrupted_then_resumed_runs_only_remaining_jobs_and_reports(tmp_path):
    grid = ["-m", *SMALL, "optimizer.lr=0.01,100000", "optimizer.batch_size=64,256"]
    env = {**os.environ, "SGD_LOG_DIR": str(tmp_path), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *grid], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        r.get("status") == "completed" for r in records(tmp_path).values()
    ):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    first = {name: r for name, r in records(tmp_path).items() if r.get("status") in ("completed", "diverged")}
    assert len(first) == 1, first.keys()

    out = run_train(grid, tmp_path)
    assert out.stdout.count("already finished") == 1  # the finished job is skipped, not rerun
    recs = records(tmp_path)
    assert len(recs) == 4
    ((name, before),) = first.items()
    assert recs[name]["segments"] == before["segments"] and recs[name]["final"] == before["final"]
    status = {
        (r["config"]["optimizer"]["lr"], r["config"]["optimizer"]["batch_size"]): r["status"]
        for r in recs.values()
    }
    assert status == {
        (0.01, 64): "completed",
        (0.01, 256): "completed",
        (1e5, 64): "diverged",
        (1e5, 256): "diverged",
    }
    for r in recs.values():
        assert r["provenance"]["git_commit"] is not None and r["provenance"]["torch_threads"] == 1
        assert r["wall_time_s"] > 0 and r["stop_reason"] in ("max_epochs", "diverged")
        assert (r["config"]["optimizer"]["lr"] == 0.01) == ("hessian/lambda_1" in r["final"])

    sweep_dir = tmp_path / "sweeps" / "fixed_lr_small"
    df, notes = report.report(sweep_dir)
    csv = pd.read_csv(sweep_dir / "report" / "runs.csv")
    assert len(csv) == 4 and set(csv["status"]) == {"completed", "diverged"}
    assert {
        "batch_size",
        "lr",
        "momentum",
        "test/acc",
        "gen_gap/acc",
        "hessian/lambda_1",
        "stability_threshold",
    } <= set(csv)
    ok = csv[csv["status"] == "completed"]
    assert (ok["stability_threshold"] - 2 * 1.9 / 0.01).abs().max() < 1e-9
    for png in ("eigenvalue_vs_batch", "accuracy_vs_batch", "robust_vs_eps"):
        assert (sweep_dir / "report" / f"{png}.png").stat().st_size > 10_000
    assert len(list((sweep_dir / "report" / "runs").glob("*.png"))) == 2
    assert sum("diverged" in n for n in notes) == 2 and not any("no result yet" in n for n in notes)


def test_report_says_what_is_missing_from_a_partial_sweep(tmp_path):
    grid = ["-m", *SMALL, "~callbacks.hessian", "~callbacks.adversarial", "optimizer.batch_size=128,512"]
    run_train(grid, tmp_path)
    sweep_dir = tmp_path / "sweeps" / "fixed_lr_small"
    path = next(
        p
        for p in sweep_dir.rglob("results.json")
        if json.loads(p.read_text())["config"]["optimizer"]["batch_size"] == 512
    )
    path.unlink()  # as if that job had not run yet
    df, notes = report.report(sweep_dir)
    assert len(df) == 1
    assert any("1 of 2 jobs have no result yet" in n and "optimizer.batch_size=512" in n for n in notes)


def test_report_matches_grid_values_by_value_and_notes_an_unreadable_record(tmp_path):
    # under a folder named "report", a value typed as 1e6 (recorded as 1000000.0), a range() sweep
    log_dir = tmp_path / "report" / "logs"
    tiny = [*NO_MEASURE, "model=mlp", "threads=1", "trainer.max_steps=2"]
    run_train(["-m", *tiny, "optimizer.lr=1e6,0.01", "seed=range(0,2)"], log_dir)
    sweep_dir = log_dir / "sweeps" / "adhoc"
    recs = {p: json.loads(p.read_text()) for p in sweep_dir.rglob("results.json")}
    assert len(recs) == 4
    (broken,) = (
        p for p, r in recs.items() if r["config"]["optimizer"]["lr"] == 0.01 and r["config"]["seed"] == 1
    )
    broken.write_text(broken.read_text()[:100])  # a truncated record
    stale = sweep_dir / "report" / "old" / "results.json"  # the report's own folder is never read
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps(next(iter(recs.values()))))
    out = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep_dir)], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    notes = [line.removeprefix("[report] note: ") for line in out.stdout.splitlines() if "note:" in line]
    assert any(n.startswith(f"unreadable record {broken} (") for n in notes), notes
    missing = [n for n in notes if "no result yet" in n]
    assert missing == ["1 of 4 jobs have no result yet: optimizer.lr=0.01,seed=1"], notes
    assert not any("not in the grid" in n for n in notes), notes
    csv = pd.read_csv(sweep_dir / "report" / "runs.csv")
    assert sorted(zip(csv["lr"], csv["seed"], strict=True)) == [(0.01, 0), (1e6, 0), (1e6, 1)]


def test_parallel_launcher_gives_the_sequential_results(tmp_path):
    grid = ["-m", *SMALL, "~callbacks.hessian", "optimizer.batch_size=128,256"]
    run_train(grid, tmp_path / "seq")
    run_train([*grid, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], tmp_path / "par")
    seq = {r["config"]["optimizer"]["batch_size"]: r["final"] for r in records(tmp_path / "seq").values()}
    par = {r["config"]["optimizer"]["batch_size"]: r["final"] for r in records(tmp_path / "par").values()}
    assert set(seq) == set(par) == {128, 256}
    for b in seq:
        for key in ("train_eval/loss", "test/acc", "val/loss", "adv/pgd_linf/eps0.1"):
            assert abs(seq[b][key] - par[b][key]) <= 1e-4, (b, key)


def test_slurm_launcher_composes_with_multi_gpu_multi_node_settings(compose, monkeypatch):
    args = [
        "hydra/launcher=slurm",
        "trainer=slurm",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "experiment=fixed_lr",
    ]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--cfg", "hydra"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    launcher = out[out.index("  launcher:") :]
    assert "SlurmLauncher" in launcher and "max_num_timeout: 10" in launcher
    cfg = compose(args)
    resolved = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (resolved["nodes"], resolved["tasks_per_node"], resolved["gpus_per_node"]) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.plugins[0].auto_requeue is False
    monkeypatch.setenv("SLURM_NTASKS", "8")  # inside the SLURM job: SLURM started the 8 ranks
    plan = validate(cfg, multirun=True)
    assert plan.world_size == 8 and plan.per_device == cfg.optimizer.batch_size // 8
    monkeypatch.delenv("SLURM_NTASKS")  # the same job launched locally would re-run the sweep: refused
    with pytest.raises(ConfigError, match="ddp_spawn"):
        validate(cfg, multirun=True)


def test_report_logs_one_wandb_run_of_job_type_report(tmp_path):
    run_train(
        ["-m", *SMALL, "~callbacks.hessian", "~callbacks.adversarial", "optimizer.batch_size=128"], tmp_path
    )
    sweep_dir = tmp_path / "sweeps" / "fixed_lr_small"
    out = subprocess.run([sys.executable, str(ROOT / "report.py"), str(sweep_dir), "--wandb"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((sweep_dir / "report" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    table = json.loads(next(runs[0].rglob("runs_*.table.json")).read_text())
    assert (
        len(table["data"]) == 1
        and "hessian/lambda_1" not in table["columns"]
        and "test/acc" in table["columns"]
    )
    figures = {p.name.split("_")[0] for p in runs[0].rglob("figures/*.png")}
    assert {"eigenvalue", "accuracy"} <= figures
    binary = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's protobuf: group and job type
    assert b"fixed_lr_small" in binary and b"report" in binary
