"""measure.py on a saved checkpoint, and adversarial (robust) training from config."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import FAST, ROOT, records, run_train

pytestmark = pytest.mark.slow

TINY = [*FAST, "model=mlp", "callbacks.hessian.subset_size=300", "callbacks.hessian.k=2", "callbacks.hessian.smallest=true",
        "callbacks.adversarial.eps=[0,0.1]", "callbacks.adversarial.pgd_steps=3"]  # fmt: skip


def test_measure_checkpoint_matches_the_training_record(tmp_path):
    run_train([*TINY, "trainer.max_epochs=1", "callbacks.adversarial.full_test_at_end=true"], tmp_path)
    ((name, rec),) = records(tmp_path).items()
    run_dir = tmp_path / "runs" / name
    args = [str(run_dir), "--float64", "--trace", "--attacks", "--density", "--density-steps", "10"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "measure.py"), *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (run_dir / "measurements").glob("last-*.json")  # <checkpoint>-<hash of the settings>
    assert f"wrote {path}" in out.stdout
    measured = json.loads(path.read_text())["metrics"]
    trained = rec["final"]
    # full_test_at_end: the whole test set (here the 500 embedded test digits = the per-epoch subset)
    assert trained["adv_full/n_samples"] == 500
    assert abs(trained["adv_full/pgd_linf/eps0.1"] - trained["adv/pgd_linf/eps0.1"]) < 1e-6
    # same samples, same weights: float64 re-measurement equals the float32 one of the callback
    for key in ("hessian/lambda_1", "hessian/lambda_2", "hessian/lambda_min"):
        assert abs(measured[key] - trained[key]) <= 1e-4 * abs(trained["hessian/lambda_1"]), key
    assert measured["hessian/trace"] > measured["hessian/lambda_1"] and measured["hessian/trace_stderr"] > 0
    for key in ("adv/clean", "adv/fgsm_linf/eps0.1", "adv/pgd_linf/eps0.1"):
        assert abs(measured[key] - trained[key]) <= 1 / 500 + 1e-9, key
    assert (run_dir / "measurements" / f"{path.stem}_density.png").stat().st_size > 5_000
    record = json.loads((run_dir / "results.json").read_text())
    assert record["checkpoint_measurements"][path.stem]["metrics"] == measured
    assert record["status"] == "completed"  # the training record itself is untouched


def measure(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(ROOT / "measure.py"), *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_measuring_again_with_other_settings_keeps_both_results(tmp_path):
    never = ["callbacks.adversarial.at_end=false", "callbacks.adversarial.every_n_epochs=1000"]
    run_train([*FAST, "model=mlp", "threads=1", "trainer.max_steps=2", "~callbacks.hessian", *never,
               "callbacks.adversarial.subset_size=50"], tmp_path)  # fmt: skip
    (run_dir,) = (p.parent for p in tmp_path.rglob("results.json"))
    attacks = [str(run_dir), "--no-hessian", "--attacks", "--eps", "0", "0.1"]
    first = measure(*attacks, "--pgd-steps", "1")
    second = measure(*attacks, "--pgd-steps", "2")
    files = sorted((run_dir / "measurements").glob("*.json"))
    assert len(files) == 2, files
    written = [re.search(r"wrote (\S+\.json)", out.stdout)[1] for out in (first, second)]
    assert sorted(written) == [str(p) for p in files]  # each run says where it wrote
    results = {p.stem: json.loads(p.read_text()) for p in files}
    assert {r["settings"]["attacks"]["pgd_steps"] for r in results.values()} == {1, 2}
    assert all(r["metrics"]["adv/n_samples"] == 50 for r in results.values())
    record = json.loads((run_dir / "results.json").read_text())
    assert record["checkpoint_measurements"] == results  # two entries, the same as the files


def test_measure_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "measure.py"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    # refused before anything is loaded: a run directory holds the record train.py wrote
    assert out.returncode == 2 and "is this a run directory of train.py?" in out.stderr
    assert f"{tmp_path} has no results.json" in out.stderr and "Traceback" not in out.stderr


def test_adversarial_training_lowers_attack_success(tmp_path):
    common = [*TINY, "~callbacks.hessian", "trainer.max_epochs=3", "optimizer.lr=0.05"]
    run_train(common, tmp_path / "natural")
    run_train(
        [*common, "adversarial_training.enabled=true", "adversarial_training.eps=0.1"], tmp_path / "robust"
    )
    (natural,) = records(tmp_path / "natural").values()
    (robust,) = records(tmp_path / "robust").values()
    assert robust["config"]["adversarial_training"]["bn_mode"] == "eval"  # recorded with the run
    for attack in ("fgsm_linf", "pgd_linf"):
        nat, rob = natural["final"][f"adv/{attack}/eps0.1"], robust["final"][f"adv/{attack}/eps0.1"]
        assert rob > nat + 0.1, (attack, nat, rob)  # attack success (1 - acc) clearly lower
    assert robust["final"]["adv/clean"] > 0.8  # and it still learned the task


def test_final_attacks_at_the_end_of_training_and_on_the_checkpoint(tmp_path):
    """APGD-CE/APGD-T (``final_attacks``) run at the final measurement only, and measure.py runs
    them on the checkpoint with the same per-sample starts: the same numbers."""
    adv = "callbacks.adversarial."
    run_train([*FAST, "model=mlp", "threads=1", "trainer.max_epochs=2", "~callbacks.hessian",
               f"{adv}subset_size=100", f"{adv}eps=[0,0.1]", f"{adv}pgd_steps=3", f"{adv}every_n_epochs=1",
               f"{adv}final_attacks=[apgdce,apgdt]", f"{adv}apgd_steps=5"], tmp_path)  # fmt: skip
    ((name, rec),) = records(tmp_path).items()
    apgd_keys = [f"adv/{k}_linf/eps0.1" for k in ("apgdce", "apgdt", "autoattack")]
    rows = [row for row in rec["history"] if "adv/pgd_linf/eps0.1" in row]
    assert (
        len(rows) == 2 and not any(k in rows[0] for k in apgd_keys) and all(k in rows[1] for k in apgd_keys)
    )
    final = rec["final"]
    assert final["adv/autoattack_linf/eps0.1"] <= final["adv/worst_linf/eps0.1"]
    run_dir = tmp_path / "runs" / name
    out = measure(str(run_dir), "--no-hessian", "--attacks")  # the run's final_attacks
    (path,) = (run_dir / "measurements").glob("last-*.json")
    measured = json.loads(path.read_text())["metrics"]
    for key in ("adv/clean", "adv/worst_linf/eps0.1", *apgd_keys):
        assert abs(measured[key] - final[key]) <= 1 / 100 + 1e-9, key
    assert "apgdce, apgdt" in out.stdout
    measure(str(run_dir), "--no-hessian", "--attacks", "--final-attacks")  # none: another result
    assert len(list((run_dir / "measurements").glob("last-*.json"))) == 2


def test_input_curvature_on_the_checkpoint_equals_the_callbacks_final_measurement(tmp_path):
    args = [*FAST, "model=mlp", "model.activation=softplus", "~callbacks.hessian", "~callbacks.adversarial",
            "'callbacks=[default,input_curvature]'".strip("'"), "callbacks.input_curvature.subset_size=30",
            "callbacks.input_curvature.pgd_steps=3", "trainer.max_epochs=1"]  # fmt: skip
    run_train(args, tmp_path)
    ((name, rec),) = records(tmp_path).items()
    run_dir = tmp_path / "runs" / name
    out = measure(str(run_dir), "--no-hessian", "--input-curvature")
    assert "input curvature" in out.stdout
    (path,) = (run_dir / "measurements").glob("last-*.json")
    measured = json.loads(path.read_text())["metrics"]
    keys = [k for k in rec["final"] if k.startswith("input/") and not k.endswith("seconds")]
    assert len(keys) >= 10
    # the same weights, samples, starts and precision (float64 copy); the PGD points are float32
    # computations, whose rounding may differ with another process's thread count (~1e-7 relative)
    for key in keys:
        if key.endswith("frac_negative"):
            assert abs(measured[key] - rec["final"][key]) <= 1 / 30 + 1e-12, key  # one example at most
        else:
            assert measured[key] == pytest.approx(rec["final"][key], rel=1e-6, abs=1e-12), key
    assert rec["final"]["input/clean/frac_negative"] > 0  # softplus: negative input curvature


def test_landscape_and_density_of_a_checkpoint_are_written_beside_the_run(tmp_path):
    """``measure.py --landscape 1d 2d --density`` on a saved run: arrays and PNGs under measurements/,
    the loss at the origin equal to the loss the run itself measured (eval mode, the same samples),
    the curve's second difference along the unit top eigenvector close to its eigenvalue."""
    import numpy as np

    run_train([*TINY, "trainer.max_epochs=1", "~callbacks.adversarial"], tmp_path)
    ((name, rec),) = records(tmp_path).items()
    run_dir = tmp_path / "runs" / name
    measure(str(run_dir), "--landscape", "1d", "2d", "--landscape-points", "5", "--landscape-eigen-range",
            "0.02", "--density", "--density-steps", "10")  # fmt: skip
    (npz,) = (run_dir / "measurements").glob("last-*_landscape.npz")
    stem = npz.name.removesuffix("_landscape.npz")
    for suffix in ("_landscape_1d.png", "_landscape_2d.png", "_density.png", "_density.npz", ".json"):
        assert (run_dir / "measurements" / f"{stem}{suffix}").stat().st_size > 0, suffix
    arrays = np.load(npz)
    a, loss = arrays["eigen_1d/coords0"], arrays["eigen_1d/loss"]
    assert len(a) == 5 and a[2] == 0
    lam = float(arrays["eigenvalues"][0])
    assert abs(lam - rec["final"]["hessian/lambda_1"]) <= 1e-3 * abs(lam)  # the run's own λ1
    second = (loss[3] - 2 * loss[2] + loss[1]) / (a[3] - a[2]) ** 2
    assert abs(second - lam) <= 0.05 * lam  # a small step along the unit eigenvector: curvature ≈ λ1
    assert arrays["eigen_2d/loss"].shape == (5, 5) and arrays["random_2d/loss"].shape == (5, 5)
