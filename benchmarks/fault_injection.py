"""Kill a small run at random moments and check that the same command always ends in one honest run.

    python benchmarks/fault_injection.py --trials 30 [--seed 0] [--out DIR]

An uninterrupted reference run first (LeNet-free MLP on the embedded digits, 3 epochs of 32 steps,
Hessian and attack measurements at every epoch end). Then, per trial, a fresh run directory and a
fault drawn with a seeded generator: SIGINT, SIGTERM or SIGKILL, delivered in a chosen phase
(after optimizer step k, at the start of the final epoch-end measurement, or in on_train_end)
by the config key ``fault=ACTION@POINT`` (the FaultInjection callback, a test tool). The same command is then re-run until the record
says the job finished (at most twice). A trial passes when:

- the faulted run's exit status and record say what happened (130 / 143 and ``interrupted`` for
  SIGINT / SIGTERM; -9 and a record still ``running`` for SIGKILL);
- the re-run ends ``completed`` with ``final`` equal to the reference's (timings aside), every
  history row once, every epoch once in the CSV log, and a wall time equal to the sum of its
  segments.

Prints one line per trial and a table of trials and failures by phase and signal.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["logger=csv", "trainer.enable_progress_bar=false", "model=mlp", "trainer.max_epochs=3", "threads=1",
        "callbacks.hessian.subset_size=200", "callbacks.hessian.k=2", "callbacks.adversarial.subset_size=100",
        "callbacks.adversarial.eps=[0,0.1]", "callbacks.adversarial.pgd_steps=3"]  # fmt: skip
STEPS = 96
EXPECTED = {"SIGINT": (130, "interrupted"), "SIGTERM": (143, "interrupted"), "SIGKILL": (-9, "running")}


def train(log_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SGD_LOG_DIR": str(log_dir), "WANDB_MODE": "disabled"}
    args = [*ARGS, f"fault={fault}"] if fault else ARGS
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def record(log_dir: Path) -> tuple[Path, dict]:
    (path,) = log_dir.rglob("results.json")
    return path.parent, json.loads(path.read_text())


def problems(job: Path, rec: dict, reference: dict) -> list[str]:
    out = []
    if rec.get("status") != "completed":
        out.append(f"status {rec.get('status')}")
    final = {k: v for k, v in rec.get("final", {}).items() if not k.endswith("/seconds")}
    ref = {k: v for k, v in reference["final"].items() if not k.endswith("/seconds")}
    if final != ref:
        diff = sorted(k for k in set(final) | set(ref) if final.get(k) != ref.get(k))
        out.append(f"final differs: {diff[:4]}")
    rows = Counter((r["step"], k) for r in rec.get("history", []) for k in r if k not in ("step", "epoch"))
    if rows and max(rows.values()) > 1:
        out.append("duplicated history rows")
    epochs = sorted(r["epoch"] for r in rec.get("history", []) if "train/loss" in r)
    if epochs != [0, 1, 2]:
        out.append(f"history epochs {epochs}")
    metrics = job / "csv" / "version_0" / "metrics.csv"
    if metrics.exists():
        with open(metrics) as f:
            csv_epochs = sorted(float(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss"))
        if csv_epochs != [0, 1, 2]:
            out.append(f"CSV epochs {csv_epochs}")
    segments = rec.get("segments", [])
    if abs(rec.get("wall_time_s", 0) - sum(s.get("wall_time_s", 0) for s in segments)) > 1e-6:
        out.append("wall time is not the sum of its segments")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="faults-"))
    ref_dir = out / "reference"
    proc = train(ref_dir)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    reference = record(ref_dir)[1]
    rng = random.Random(args.seed)
    tally: Counter = Counter()
    failures: Counter = Counter()
    for t in range(args.trials):
        action = rng.choice(["SIGINT", "SIGTERM", "SIGKILL"])
        phase = rng.choices(["batch", "final_measurement", "train_end"], weights=[3, 1, 1])[0]
        point = f"batch:{rng.randint(1, STEPS - 1)}" if phase == "batch" else phase
        log = out / f"trial{t:02d}"
        first = train(log, f"{action}@{point}")
        code, status = EXPECTED[action]
        _, rec = record(log)
        issues = []
        if (first.returncode, rec.get("status")) != (code, status):
            issues.append(f"faulted run: exit {first.returncode}, status {rec.get('status')}")
        for _ in range(2):
            again = train(log)
            _, rec = record(log)
            if rec.get("status") == "completed" or again.returncode != 0:
                break
        job, rec = record(log)
        issues += problems(job, rec, reference)
        tally[(phase, action)] += 1
        if issues:
            failures[(phase, action)] += 1
        print(f"trial {t:2d}  {action:7s} @ {point:17s}  -> {'ok' if not issues else 'FAIL: ' + '; '.join(issues)}",
              flush=True)  # fmt: skip
    print(f"\n{'phase':<18}{'signal':<9}{'trials':>7}{'failed':>7}")
    for key in sorted(tally):
        print(f"{key[0]:<18}{key[1]:<9}{tally[key]:>7}{failures[key]:>7}")
    print(f"{'all':<27}{sum(tally.values()):>7}{sum(failures.values()):>7}  (runs under {out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
