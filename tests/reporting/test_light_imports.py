"""Reading a sweep's records imports neither torch nor Lightning: the report runs on any machine
that has the records, and starts in the time pandas and matplotlib take, not torch's."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT
from tests.test_report import record, write

HEAVY = ("torch", "pytorch_lightning", "lightning")


def heavy(module: str) -> bool:
    return any(module == h or module.startswith(f"{h}.") for h in HEAVY)


def test_loading_and_tidying_a_sweep_imports_no_torch(tmp_path):
    sweep = write(tmp_path / "sweep", [record(b, s, 10.0, 0.9) for b in (32, 512) for s in (0, 1)])
    code = (
        "import sys, pathlib, reporting.runs as r, reporting.verdicts as v\n"
        f"runs, notes = r.load_runs(pathlib.Path({str(sweep)!r}))\n"
        "df = r.tidy(runs); table, _ = v.verdicts(df)\n"
        "assert len(df) == 4 and not notes and len(table), (df, notes)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_report_py_without_wandb_imports_no_torch(tmp_path):
    sweep = write(tmp_path / "sweep", [record(b, s, 10.0, 0.9) for b in (32, 512) for s in (0, 1)])
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "report.py", str(sweep), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "import time:" in line]
    assert "pandas" in imported and "reporting.runs" in imported  # the check reads the right output
    assert [m for m in imported if heavy(m)] == []
    assert (tmp_path / "out" / "verdicts.md").exists()
