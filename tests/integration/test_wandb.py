"""W&B as the study's dashboard, read back with W&B's own reader of offline runs.

Every check reads the ``.wandb`` transaction log that ``wandb sync`` would upload, with
``wandb leet inspect --json`` (every record: run, metric definitions, history rows, artifacts,
config) and ``--summary --json`` (the run's final state): a sweep logged live, a CSV run sent
later with ``wandb_sync.py``, an offline run interrupted and resumed, and the report's run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import ROOT, records, run_train

pytestmark = pytest.mark.slow

WANDB = shutil.which("wandb", path=os.path.dirname(sys.executable)) or "wandb"
SMALL = ["model=mlp", "threads=1", "trainer.enable_progress_bar=false", "~callbacks.hessian",
         "callbacks.adversarial.subset_size=20", "callbacks.adversarial.pgd_steps=2"]  # fmt: skip
CONSTANTS = {
    "opt/batch_size",
    "opt/per_device_batch",
    "opt/micro_batch",
    "opt/momentum",
    "opt/lr",
    "adv/n_samples",
}


def offline_env(tmp_path: Path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}  # fmt: skip


def leet(path: Path, *extra: str) -> str:
    out = subprocess.run([WANDB, "leet", "inspect", *extra, "--json", str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def read_back(log: Path) -> dict:
    """The run as W&B's reader sees it: run record, summary, metric definitions, history, artifacts."""
    run, metrics, history, artifacts, config = {}, {}, [], [], {}
    for line in leet(log).splitlines():
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            run = rec["run"]
        elif kind == "metric" and "name" in rec["metric"]:  # (glob definitions have none)
            metrics[rec["metric"]["name"]] = rec["metric"].get("step_metric")
        elif kind == "history":
            history.append({k: v for k, v in rec["history"]["item"].items() if not k.startswith("_")})
        elif kind == "artifact":
            artifacts.append(rec["artifact"])
        elif kind == "config":
            config.update(rec["config"]["update"])
    state = json.loads(leet(log, "--summary"))
    return {"run": run, "state": state, "summary": state["summary"], "metrics": metrics, "history": history,
            "artifacts": artifacts, "config": config}  # fmt: skip


def logs(job: Path) -> list[Path]:
    return sorted(job.glob("wandb/offline-run-*/run-*.wandb"))


def epochs_of(history: list[dict], name: str) -> list[float]:
    return [row["epoch"] for row in history if name in row]


def assert_summary_is_final(back: dict, record: dict) -> None:
    summary = back["summary"]
    for key, value in record["final"].items():
        assert isinstance(summary.get(key), int | float), (key, summary.get(key))  # a plain number
        assert summary[key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert summary["status"] == record["status"] and summary["stop_reason"] == record["stop_reason"]
    assert (summary["epochs"], summary["steps"]) == (record["stopped_at_epoch"], record["stopped_at_step"])


def assert_every_epoch_once(back: dict, record: dict) -> None:
    """Each per-epoch metric W&B charts holds each epoch of the record once, on the epoch axis."""
    charted = {k for row in back["history"] for k in row} - {
        "epoch",
        "trainer/global_step",
        "train/loss_step",
    }
    assert charted, "no per-epoch metric in the history"
    for name in charted:
        expected = [row["epoch"] for row in record["history"] if name in row]
        assert epochs_of(back["history"], name) == expected, name
        assert back["metrics"].get(name) == "epoch", name


def test_a_sweep_reads_in_wandb_as_the_study_is_read(tmp_path):
    env = offline_env(tmp_path)
    args = ["-m", "logger=wandb", "logger.wandb.log_model=true", "experiment_name=wb", *SMALL,
            "trainer.max_epochs=2", "+callbacks.user._target_=tests.integration.user_callback.WeightNorm",
            "optimizer.batch_size=64,128", "seed=0,1"]  # fmt: skip
    run_train(args, tmp_path, env=env)
    recs = records(tmp_path)
    sweep_dir = tmp_path / "sweeps" / "wb"
    assert len(recs) == 4
    groups: dict[str, set] = defaultdict(set)
    for name, record in recs.items():
        job = sweep_dir / name
        (log,) = logs(job)  # one run per job
        back = read_back(log)
        assert back["run"]["run_id"] == (job / "wandb_id.txt").read_text().strip()
        assert back["state"]["state"] == "finished"
        # runs table: the record's final values as plain numbers, how the run ended
        assert_summary_is_final(back, record)
        # no training target configured: nothing to reach, so no reached_target (one definition with
        # the report: lifecycle.record.reached_target)
        assert record["stop_reason"] == "max_epochs" and "reached_target" not in back["summary"]
        # grouping: a group per grid point, the experiment as tag, config columns for the grid
        assert back["run"]["job_type"] == "train" and back["run"]["tags"] == ["wb"]
        groups[back["run"]["run_group"]].add(record["config"]["seed"])
        cfg = back["state"]["config"]
        assert cfg["optimizer"]["batch_size"] == record["config"]["optimizer"]["batch_size"]
        assert cfg["effective_lr"] == record["config"]["optimizer"]["lr"]
        # charts: every per-epoch metric on the epoch axis, a user's callback's too; per-step loss not
        assert_every_epoch_once(back, record)
        assert {"train/loss", "test/acc", "adv/pgd_linf/eps0.3", "weights/l2_norm"} <= set(back["metrics"])
        assert back["metrics"].get("train/loss_step") != "epoch"
        assert any("train/loss_step" in row for row in back["history"])
        # constants: in the summary, never in the history
        assert not CONSTANTS & {k for row in back["history"] for k in row}
        assert all(back["summary"][k] == pytest.approx(record["final"][k]) for k in CONSTANTS)
        # the checkpoints, with the record, as an artifact
        (model,) = [a for a in back["artifacts"] if a["type"] == "model"]
        files = {c["path"] for c in model["manifest"]["contents"]}
        assert model["name"] == f"model-{back['run']['run_id']}" and "results.json" in files
        assert "checkpoints/last.ckpt" in files
    assert len(groups) == 2 and all(seeds == {0, 1} for seeds in groups.values()), groups
    assert all(g.startswith("wb/") for g in groups)

    # the report run: one table row per job, the figures as native W&B charts
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "report.py", str(sweep_dir), "--out", str(out), "--wandb"],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-3000:]
    (report_log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    back = read_back(report_log)
    assert back["run"]["job_type"] == "report"
    (table,) = report_log.parent.glob("files/media/table/runs_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 4
    chart = back["config"]["_wandb.visualize.charts/test_acc_vs_batch"]
    assert chart["panel_type"] == "Vega2" and chart["panel_config"]["panelDefId"] == "wandb/line/v0"
    assert chart["panel_config"]["fieldSettings"] == {"x": "batch_size", "y": "test_acc", "stroke": "series"}
    charted = back["history"][0]
    assert charted["charts/test_acc_vs_batch_table.nrows"] == 2  # two batch sizes, means over seeds
    assert "charts/robust_vs_eps_pgd_linf_table.nrows" in charted

    # the backfill finds every job already sent by the job itself: nothing twice
    sync = subprocess.run([sys.executable, "wandb_sync.py", str(sweep_dir)], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "0 sent, 4 skipped" in sync.stdout
    assert all(len(logs(sweep_dir / name)) == 1 for name in recs)


def test_a_csv_run_is_sent_later_once_by_wandb_sync_or_a_rerun_with_wandb(tmp_path):
    env = offline_env(tmp_path)
    run_train([*SMALL, "logger=csv", "trainer.max_epochs=2"], tmp_path, env=env)
    ((name, record),) = records(tmp_path).items()
    job = tmp_path / "runs" / name
    assert logs(job) == []

    def sync():
        out = subprocess.run([sys.executable, "wandb_sync.py", str(tmp_path / "runs")], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert "1 sent" in sync()
    (log,) = logs(job)
    back = read_back(log)
    assert back["run"]["run_id"] == (job / "wandb_id.txt").read_text().strip()
    assert_summary_is_final(back, record)
    assert_every_epoch_once(back, record)
    assert not CONSTANTS & {k for row in back["history"] for k in row}
    steps = [row["trainer/global_step"] for row in back["history"] if "train/loss_step" in row]
    assert steps and steps == sorted(set(steps))  # the per-step loss from the CSV log, once each
    assert back["artifacts"] == []  # checkpoints only when asked
    assert "0 sent, 1 skipped" in sync()  # twice: still one run
    # the finished job re-run with logger=wandb: W&B already holds it
    again = run_train([*SMALL, "logger=wandb", "trainer.max_epochs=2"], tmp_path, env=env)
    assert "already finished" in again.stdout and "W&B: skipped: already sent" in again.stdout
    assert logs(job) == [log]


def test_a_resumed_offline_run_holds_every_epoch_once_in_its_newest_log(tmp_path):
    env = offline_env(tmp_path)
    args = [*SMALL, "~callbacks.adversarial", "logger=[csv,wandb]", "trainer.max_epochs=3"]
    first = run_train([*args, "fault=SIGTERM@batch:40"], tmp_path, env=env, check=False)
    assert first.returncode == 143, first.stderr[-2000:]  # interrupted in epoch 1, checkpoint after epoch 0
    run_train(args, tmp_path, env=env)
    ((name, record),) = records(tmp_path).items()
    job = tmp_path / "runs" / name
    old, new = logs(job)
    assert old.name == new.name  # one run id across both segments
    interrupted = read_back(old)
    assert interrupted["summary"]["status"] == "interrupted" and interrupted["state"]["state"] == "failed"
    back = read_back(new)
    assert record["status"] == "completed" and len(record["segments"]) == 2
    assert_summary_is_final(back, record)
    assert_every_epoch_once(back, record)
    assert epochs_of(back["history"], "train/loss") == [0, 1, 2]
    steps = [row["trainer/global_step"] for row in back["history"] if "train/loss_step" in row]
    assert steps == sorted(set(steps)) and steps[0] < 32 < steps[-1]  # replayed from the CSV log, then new


def test_the_input_curvature_reaches_wandb_as_numbers_and_per_example_histograms(tmp_path):
    env = offline_env(tmp_path)
    args = ["logger=wandb", "model=mlp", "model.activation=softplus", "threads=1", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "~callbacks.hessian", "~callbacks.adversarial",
            "callbacks=[default,input_curvature]", "callbacks.input_curvature.subset_size=20",
            "callbacks.input_curvature.pgd_steps=2"]  # fmt: skip
    run_train(args, tmp_path, env=env)
    (record,) = records(tmp_path).values()
    (job,) = [p.parent for p in tmp_path.rglob("results.json")]
    (log,) = logs(job)
    back = read_back(log)
    # the summary numbers are the record's
    for key in ("input/clean/top_mean", "input/pgd_eps0.1/frac_negative", "input/converged"):
        assert back["summary"][key] == pytest.approx(record["final"][key], rel=1e-12), key
    # one histogram per point set, of the 20 examples' top eigenvalues, on the epoch axis
    # (the reader flattens a histogram into <name>._type, .bins, .values)
    rows = [row for row in back["history"] if "input/clean/top_hist._type" in row]
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["input/clean/top_hist._type"] == "histogram"
    assert sum(rows[0]["input/clean/top_hist.values"]) == 20
    bins = rows[0]["input/clean/top_hist.bins"]
    assert min(bins) <= record["final"]["input/clean/top_median"] <= max(bins)
    assert back["metrics"].get("input/pgd_eps0.1/top_hist") == "epoch"
