"""What the epoch-end measurements cost: a run's wall time with and without them, as a ratio.

    python benchmarks/measurement_overhead.py [--repeats 3] [--settings default small_study]

For each setting, runs ``python train.py`` with its measurement callbacks (Hessian spectrum and
adversarial accuracy) and without them (``~callbacks.hessian ~callbacks.adversarial``),
alternating, ``--repeats`` times each, and prints the medians of two wall times and their ratios:
the command's (what a user waits for, Python's start-up and imports included) and the job's own
(the record's ``wall_time_s``), and the run's time split (``time_split`` of the record: training,
evaluation, Hessian, attacks). Settings:

- ``default``: ``python train.py`` as a user runs it (LeNet, 10 epochs, embedded digits);
- ``small_study``: one job of the small study's settings (``experiment=fixed_lr_small``,
  ``optimizer.batch_size=128``, ``threads=1``).

The goal the project set: the default run at most 2.5x its training-only time (ideally 2x).
Run it on a quiet machine: other processes on the same cores change both sides of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

SETTINGS = {
    "default": ["trainer.enable_progress_bar=false", "logger=none"],
    "small_study": [
        "experiment=fixed_lr_small",
        "optimizer.batch_size=128",
        "threads=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ],  # fmt: skip
}
WITHOUT = ["~callbacks.hessian", "~callbacks.adversarial"]


def run(args: list[str], log_dir: Path) -> tuple[float, dict]:
    env = {**os.environ, "SGD_LOG_DIR": str(log_dir), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    (record,) = log_dir.rglob("results.json")
    return seconds, json.loads(record.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="overhead-"))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.repeats} alternating repeats, median")
    for name in args.settings:
        times: dict[str, list[float]] = {"with": [], "without": []}
        job: dict[str, list[float]] = {"with": [], "without": []}
        split = {}
        for r in range(args.repeats):
            for side in ("with", "without"):
                extra = [] if side == "with" else WITHOUT
                seconds, rec = run([*SETTINGS[name], *extra], out / f"{name}-{side}-{r}")
                times[side].append(seconds)
                job[side].append(rec["wall_time_s"])
                if side == "with":
                    split = rec.get("time_split", {})
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
        for label, t in (("command", times), ("job", job)):
            with_s, without_s = statistics.median(t["with"]), statistics.median(t["without"])
            print(
                f"{name} ({label}): with measurements {with_s:.1f} s, without {without_s:.1f} s, "
                f"ratio {with_s / without_s:.2f}x"
            )
        print(f"  time split of the last run with measurements: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
