"""docs/extending.md's "Adding a callback", followed literally in a copy of the project.

The two files are written from the page's code blocks (the first line of each names its
path) and the command is the page's own ``python train.py ...``. Only run-length overrides
are appended (two epochs, no Hessian/attack callbacks, CSV and W&B logging, offline) so the
test takes seconds; the callback, its YAML and the way it is selected are the page's.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

FAST_TAIL = ["trainer.max_epochs=2", "~callbacks.hessian", "~callbacks.adversarial",
             "logger=[csv,wandb]", "trainer.enable_progress_bar=false"]  # fmt: skip


def readme_section(title: str) -> str:
    text = (ROOT / "docs" / "extending.md").read_text()
    start = text.index(f"### {title}")
    end = text.index("\n## ", start)
    return text[start:end]


def test_readme_callback_example_reaches_csv_record_report_and_wandb_epoch_axis(tmp_path):
    section = readme_section("Adding a callback")
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", section, flags=re.S)
    files = {block.splitlines()[0].lstrip("# ").strip(): block for block in blocks}
    assert set(files) == {"callbacks/weight_norm.py", "conf/callbacks/weight_norm.yaml"}
    (command,) = re.findall(r"`(python train\.py [^`]+)`", section)

    project = tmp_path / "project"
    shutil.copytree(
        ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb")
    )
    for rel, content in files.items():
        (project / rel).write_text(content)

    logs = tmp_path / "logs"
    env = {**os.environ, "SGD_LOG_DIR": str(logs), "WANDB_MODE": "offline"}
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    proc = subprocess.run([sys.executable, *argv[1:], *FAST_TAIL], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p.parent for p in logs.rglob("results.json")]

    # the record: per epoch in the history, and in final
    record = json.loads((job / "results.json").read_text())
    epochs = [row["epoch"] for row in record["history"] if "weights/l2_norm" in row]
    assert epochs == [0, 1] and record["final"]["weights/l2_norm"] > 0

    # the CSV log: one row per epoch holds the value
    with open(job / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("weights/l2_norm")]
    assert [float(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["weights/l2_norm"]) == pytest.approx(record["final"]["weights/l2_norm"])

    # the report's CSV has a column for it
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "report.py", str(logs / "runs"), "--out", str(out)], cwd=project,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-3000:]
    with open(out / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["weights/l2_norm"]) == pytest.approx(record["final"]["weights/l2_norm"])

    # W&B, read with its own reader: the metric is defined on the epoch axis; the per-step loss is not
    (run_file,) = job.glob("wandb/offline-run-*/*.wandb")
    wandb_cli = shutil.which("wandb", path=os.path.dirname(sys.executable)) or "wandb"
    dump = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(run_file)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert dump.returncode == 0, dump.stderr[-2000:]
    metrics = {}
    for line in dump.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "metric" and "name" in rec["metric"]:  # (glob definitions have none)
            metrics[rec["metric"]["name"]] = rec["metric"].get("step_metric")
    assert metrics["weights/l2_norm"] == "epoch"
    assert metrics["train/loss"] == "epoch"
    assert metrics.get("train/loss_step") != "epoch"
