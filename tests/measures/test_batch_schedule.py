"""The ABS / ABSA doubling rule on scripted eigenvalue sequences (torch-free)."""

from __future__ import annotations

import math

import pytest

from measures.batch_schedule import (
    BatchState,
    adversarial_count,
    adversarial_ratio,
    lr_multiplier,
    next_state,
    schedule,
)


def batches(out):
    return [s.batch_size for s, _ in out]


def test_halving_eigenvalue_doubles_and_resets_the_reference():
    out = schedule([10.0, 8.0, 5.0, 4.0, 2.4], base_batch=32, max_batch=1024, duration=10)
    assert [why for _, why in out] == ["first", "kept", "eigenvalue", "kept", "eigenvalue"]
    assert batches(out) == [32, 32, 64, 64, 128]
    assert [s.lambda_ref for s, _ in out] == [10.0, 10.0, 5.0, 5.0, 2.4]
    assert [s.lr_scale for s, _ in out] == [1, 1, 2, 2, 4]


def test_duration_doubles_and_keeps_the_reference():
    out = schedule([10.0, 9.0, 9.5, 9.0, 8.0, 7.0], base_batch=32, max_batch=1024, duration=3)
    # epochs since a doubling reach 3 at the 3rd epoch end, and again 3 epochs later
    assert batches(out) == [32, 32, 64, 64, 64, 128]
    assert [why for _, why in out][2] == "duration"
    assert all(s.lambda_ref == 10.0 for s, _ in out)


def test_duration_one_doubles_every_epoch_until_the_cap_then_measures_nothing():
    out = schedule([10.0, 9.0, 8.0, 1.0, 1.0], base_batch=32, max_batch=128, duration=1)
    assert batches(out) == [64, 128, 128, 128, 128]
    assert [why for _, why in out] == ["duration", "duration", "capped", "capped", "capped"]
    # at the cap the eigenvalue is not even looked at: a low one changes nothing
    capped = out[1][0]
    assert next_state(capped, 0.0, max_batch=128, duration=1) == (capped, "capped")


def test_trigger_factor_and_never_past_the_cap():
    # trigger 3: 3.5 > 10/3 keeps the batch, 3.0 <= 10/3 doubles it; then the cap
    out = schedule([10.0, 3.5, 3.0, 0.1], base_batch=32, max_batch=64, duration=10, trigger=3.0)
    assert batches(out) == [32, 32, 64, 64]
    assert [why for _, why in out] == ["first", "kept", "eigenvalue", "capped"]


@pytest.mark.parametrize(("rule", "expected"), [("linear", 2.0), ("sqrt", math.sqrt(2)), ("none", 1.0)])
def test_lr_multiplier(rule, expected):
    assert lr_multiplier(rule, 2) == expected
    out = schedule([10.0, 4.0, 1.0], base_batch=32, max_batch=1024, duration=10, lr_scaling=rule)
    assert out[-1][0].lr_scale == pytest.approx(expected**2)


def test_adversarial_ratio_halves_at_each_doubling_and_stops():
    out = schedule([10.0, 9.0, 8.0, 7.0, 6.0, 5.0], base_batch=32, max_batch=4096, duration=1, adv_ratio=0.2)
    ratios = [s.adv_ratio for s, _ in out]
    assert ratios == pytest.approx([0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125])
    # in force: 0 once <= 1/B0 (0.03125), or from epoch max_epochs/2 on
    used = [adversarial_ratio(r, epoch=e, max_epochs=100, base_batch=32) for e, r in enumerate(ratios)]
    assert used == pytest.approx([0.1, 0.05, 0.0, 0.0, 0.0, 0.0])
    assert adversarial_ratio(0.2, epoch=4, max_epochs=10, base_batch=32) == 0.2
    assert adversarial_ratio(0.2, epoch=5, max_epochs=10, base_batch=32) == 0.0
    assert adversarial_ratio(0.2, epoch=500, max_epochs=None, base_batch=32) == 0.2


def test_adversarial_count_is_the_floor():
    assert adversarial_count(0.2, 32) == 6
    assert adversarial_count(0.1, 32) == 3
    assert adversarial_count(0.3, 10) == 3  # 0.3 * 10 = 2.9999999999999996 in floats
    assert adversarial_count(0.05, 16) == 0


def test_state_is_plain_data():
    s = BatchState(32, 1.5, 2, 4.0, 0.05, 2)
    assert BatchState(**s.__dict__) == s


def test_noise_estimates_recover_a_known_gradient_and_covariance():
    """Per-example gradients G + ε, ε ~ N(0, diag(σ²)): over many draws of a B_small and a B_big
    batch (B_small of its samples), the estimates' means are |G|² and tr(Σ), and B_noise their ratio."""
    import torch

    from measures.batch_schedule import noise_estimates, noise_scale

    gen = torch.Generator().manual_seed(0)
    d, b_small, b_big, trials = 50, 8, 64, 4000
    g = torch.linspace(-0.2, 0.3, d, dtype=torch.float64)
    sigma = torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    eps = torch.randn(trials, b_big, d, generator=gen, dtype=torch.float64) * sigma
    grads = g + eps
    small_sq = grads[:, :b_small].mean(1).square().sum(1)
    big_sq = grads.mean(1).square().sum(1)
    sums = [0.0, 0.0]
    for s, b in zip(small_sq.tolist(), big_sq.tolist(), strict=True):
        g2, trace = noise_estimates(s, b, b_small, b_big)
        sums = [sums[0] + g2, sums[1] + trace]
    true_g2, true_trace = float(g.square().sum()), float(sigma.square().sum())
    assert sums[0] / trials == pytest.approx(true_g2, rel=0.05)
    assert sums[1] / trials == pytest.approx(true_trace, rel=0.02)
    assert noise_scale(*sums) == pytest.approx(true_trace / true_g2, rel=0.06)
    # exact on expectations: E|G_B|² = |G|² + tr(Σ)/B
    assert noise_estimates(2 + 10 / 4, 2 + 10 / 16, 4, 16) == pytest.approx((2.0, 10.0))
    with pytest.raises(ValueError):
        noise_estimates(1.0, 1.0, 16, 16)


def test_noise_policy_grows_to_the_next_power_of_two_capped_and_never_shrinks():
    from measures.batch_schedule import BatchState, next_noise_state, noise_batch, noise_scale

    assert [noise_batch(b, 32, 1024) for b in (-5.0, math.nan, 10.0, 32.0, 33.0, 64.0, 100.0, 5000.0)] == [
        32, 32, 32, 32, 64, 64, 128, 1024,
    ]  # fmt: skip
    assert math.isnan(noise_scale(-1.0, 5.0))
    s, why = next_noise_state(BatchState(64, adv_ratio=0.2), 300.0, base_batch=32, max_batch=1024)
    assert (s.batch_size, s.lr_scale, s.adv_ratio, s.doublings, why) == (512, 8.0, 0.025, 3, "noise_scale")
    s2, why = next_noise_state(s, 40.0, base_batch=32, max_batch=1024, lr_scaling="sqrt")
    assert (s2.batch_size, s2.lr_scale, why) == (512, 8.0, "kept")
    s3, why = next_noise_state(s, 2000.0, base_batch=32, max_batch=1024, lr_scaling="sqrt")
    assert (s3.batch_size, s3.lr_scale, why) == (1024, pytest.approx(8 * math.sqrt(2)), "noise_scale")
    assert next_noise_state(s3, 1e6, base_batch=32, max_batch=1024)[1] == "capped"
