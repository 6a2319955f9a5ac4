"""The two ways of computing Hessian-vector products measure the same spectrum in a real run.

One ``train.py`` run (the default LeNet on the embedded digits, 1 epoch) carries the default
``HessianSpectrum`` with ``hvp=double_backward`` and a second instance with
``hvp=forward_over_reverse`` on the same fixed samples: the same weights, two routes. Then
``measure.py --hvp forward_over_reverse`` re-measures the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import FAST, ROOT, records, run_train

pytestmark = pytest.mark.slow

TOL = 1e-4
SETTINGS = {"subset_size": 128, "k": 3, "tol": 1e-6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("hvp_modes")
    target = "callbacks.hessian_spectrum.HessianSpectrum"
    second = [
        f"+callbacks.fr._target_={target}",
        "+callbacks.fr.prefix=fr",
        "+callbacks.fr.hvp=forward_over_reverse",
    ]
    run_train([*FAST, "threads=1", "trainer.max_epochs=1", "~callbacks.adversarial",
               "callbacks.hessian.hvp=double_backward", *[f"callbacks.hessian.{k}={v}" for k, v in SETTINGS.items()],
               *second, *[f"+callbacks.fr.{k}={v}" for k, v in SETTINGS.items()]], log_dir)  # fmt: skip
    ((name, record),) = records(log_dir).items()
    return log_dir / "runs" / name, record


def top3(values: dict, prefix: str) -> list[float]:
    return [values[f"{prefix}/lambda_{i}"] for i in (1, 2, 3)]


def test_both_modes_give_the_same_top3_and_say_which_they_used(run):
    _, record = run
    final = record["final"]
    db, fr = top3(final, "hessian"), top3(final, "fr")
    assert max(abs(a - b) for a, b in zip(db, fr, strict=True)) <= TOL * abs(db[0]), (db, fr)
    assert (final["hessian/hvp_forward_over_reverse"], final["fr/hvp_forward_over_reverse"]) == (0.0, 1.0)
    assert record["hessian_products"] == {"batch_size": 250, "hvp": "double_backward"}
    assert record["fr_products"] == {"batch_size": 250, "hvp": "forward_over_reverse"}


def test_measure_py_with_forward_over_reverse_matches_the_run(run):
    run_dir, record = run
    out = subprocess.run(
        [sys.executable, str(ROOT / "measure.py"), str(run_dir), "--hvp", "forward_over_reverse"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (run_dir / "measurements").glob("last-*.json")
    measured = json.loads(path.read_text())["metrics"]
    assert measured["hessian/hvp_forward_over_reverse"] == 1.0
    db = top3(record["final"], "hessian")
    assert max(abs(a - b) for a, b in zip(top3(measured, "hessian"), db, strict=True)) <= TOL * abs(db[0])
