"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU check keeps working where CI runs (no GPU).

Its numbers are the check's own business; here: it exits 0, every section made rows, none failed, and
the Hessian and attack rows compare what they say they compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "tests",
    "default run",
    "ResNet-20 run",
    "throughput",
    "Hessian",
    "Hessian product",
    "attacks",
    "sweep",
)


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_prints_its_table(tmp_path):
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--markdown", str(table)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [
        line.split(" | ")
        for line in table.read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    sections = {r[0].removeprefix("| ") for r in rows[1:]}
    assert sections == set(SECTIONS), sections
    assert not [r for r in rows if "FAIL" in r[-1]]
    assert "machine: " in table.read_text().splitlines()[0]
    (hessian,) = [r for r in rows if r[0] == "| Hessian"]
    assert "max rel. error" in hessian[2] and hessian[3].startswith("pass")
    masks = [r for r in rows if r[0] == "| attacks" and "robust masks" in r[1]]
    assert len(masks) == 2 and all(r[3].strip(" |") == "pass" for r in masks)
