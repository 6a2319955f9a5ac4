"""The Hessian measurement over a real 10-epoch run of the default model, against a float64 reference.

One ``train.py`` run (LeNet on the embedded digits, the default training) carries four
``HessianSpectrum`` instances on the same 128 fixed training samples: the default (eigenvalue
stop, tol 1e-4), the same warm-started, the former default (residual stop, tol 1e-5) and a
float64 reference (eigenvalue stop at 1e-9). Each restores the RNG, so all four measure the
weights of every epoch of one training run. About 1-2 min on 2 cores.
"""

from __future__ import annotations

import pytest

from tests.helpers import FAST, records, run_train

pytestmark = pytest.mark.slow

EPOCHS = 10
TOL = 1e-4
TARGET = "callbacks.hessian_spectrum.HessianSpectrum"
# every epoch, with lambda_min (the default run measures every 2 epochs, without it)
COMMON = {"subset_size": 128, "batch_size": 128, "every_n_epochs": 1, "smallest": "true"}


def instance(name: str, **settings) -> list[str]:
    return [f"+callbacks.{name}._target_={TARGET}", f"+callbacks.{name}.prefix={name}"] + [
        f"+callbacks.{name}.{k}={v}" for k, v in {**COMMON, **settings}.items()
    ]


def spectrum(row: dict, prefix: str) -> list[float]:
    return [row[f"{prefix}/lambda_{i}"] for i in (1, 2, 3)] + [row[f"{prefix}/lambda_min"]]


@pytest.fixture(scope="module")
def epochs(tmp_path_factory) -> dict[int, dict]:
    log_dir = tmp_path_factory.mktemp("hessian_accuracy")
    run_train([*FAST, "threads=1", f"trainer.max_epochs={EPOCHS}", "~callbacks.adversarial",
               *[f"callbacks.hessian.{k}={v}" for k, v in COMMON.items()],
               *instance("hessian_warm", warm_start="true"),
               *instance("hessian_old", stop="residual", tol=1e-5),
               *instance("hessian_ref", float64="true", tol=1e-9, max_iter=300)], log_dir, timeout=900)  # fmt: skip
    (record,) = records(log_dir).values()
    rows: dict[int, dict] = {}
    for row in record["history"]:
        if "hessian/lambda_1" in row or "hessian_ref/lambda_1" in row:
            rows.setdefault(int(row["epoch"]), {}).update(row)
    return rows


def test_every_epoch_is_measured_by_all_four(epochs):
    assert sorted(epochs) == list(range(EPOCHS))
    for row in epochs.values():
        for prefix in ("hessian", "hessian_warm", "hessian_old", "hessian_ref"):
            assert row[f"{prefix}/converged"] == 1.0, prefix
    # the warm start was used (every epoch after the first, unless it fell back to a cold start)
    assert sum(row["hessian_warm/warm"] for row in epochs.values()) >= EPOCHS // 2


@pytest.mark.parametrize("prefix", ["hessian", "hessian_warm"])
def test_within_the_tolerance_of_the_float64_reference_at_every_epoch(epochs, prefix):
    """Top-3 and λ_min within tol·|λ_1| of the float64 reference, and the logged error estimate
    (hessian/rel_error) at least the error (beyond the ~1e-6 float32 rounding of the products).

    The warm start is held to this for the top-3 only: its λ_min missed the tolerance at one epoch
    here (6.7e-4 of |λ_1| at epoch 7, reporting a near-degenerate neighbour), as in
    ``benchmarks/hessian_warm.py``; that is why ``warm_start`` is off by default (README)."""
    for epoch, row in epochs.items():
        ref = spectrum(row, "hessian_ref")
        ours = spectrum(row, prefix)
        n = 3 if prefix == "hessian_warm" else 4
        err = max(abs(a - b) for a, b in zip(ours[:n], ref[:n], strict=True)) / abs(ref[0])
        assert err <= TOL, (epoch, err, ours, ref)
        assert err <= row[f"{prefix}/rel_error"] + 2e-6, (epoch, err, row[f"{prefix}/rel_error"])


def test_the_eigenvalue_stop_and_the_warm_start_cost_fewer_products(epochs):
    """Than the former default (residual stop, 1e-5); the warm start than a cold one (a few percent
    on this run: the top eigenvalues are outliers that a cold Lanczos finds in ~12 products)."""
    new = sum(row["hessian/n_hvp"] for row in epochs.values())
    old = sum(row["hessian_old/n_hvp"] for row in epochs.values())
    warm = sum(row["hessian_warm/n_hvp"] for row in epochs.values())
    print(
        f"products over {EPOCHS} epochs: default {new:.0f}, warm {warm:.0f}, former residual stop {old:.0f}"
    )
    assert new < old
    assert warm < new
