"""No silent wrong number: a measurement short of its stop says so, and settings that cannot
work are refused before training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.hessian_spectrum import HessianSpectrum
from lightning_modules.config import ConfigError
from tests.callbacks.test_callbacks import tiny_bn_net


def _data():
    torch.manual_seed(1)
    return torch.rand(17, 1, 6, 6, dtype=torch.float64), torch.arange(17) % 3


def test_an_unconverged_spectrum_is_flagged_and_warned_with_epoch_error_tol_and_what_to_change():
    x, y = _data()
    cb = HessianSpectrum(k=1, max_iter=2, tol=1e-8, progress_after_s=None)
    with pytest.warns(UserWarning, match="UNCONVERGED at epoch 3") as caught:
        metrics = cb.measure(tiny_bn_net(), nn.functional.cross_entropy, x, y, where="epoch 3")
    assert metrics["hessian/converged"] == 0.0
    (message,) = [str(w.message) for w in caught if "UNCONVERGED" in str(w.message)]
    assert f"{metrics['hessian/rel_error']:.3g}" in message and "tol 1e-08" in message
    assert "callbacks.hessian.max_iter" in message and "callbacks.hessian.tol" in message


def test_a_converged_spectrum_warns_nothing():
    x, y = _data()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = HessianSpectrum(k=1, tol=1e-6).measure(tiny_bn_net(), nn.functional.cross_entropy, x, y)
    assert metrics["hessian/converged"] == 1.0


def test_an_unconverged_trace_flags_the_measurement_and_warns():
    x, y = _data()
    cb = HessianSpectrum(k=1, tol=1e-6, trace=True, trace_rtol=1e-9, trace_max_samples=10)
    with pytest.warns(UserWarning, match="trace standard error .* > trace_rtol 1e-09"):
        metrics = cb.measure(tiny_bn_net(), nn.functional.cross_entropy, x, y)
    assert metrics["hessian/trace_converged"] == 0.0 and metrics["hessian/converged"] == 0.0


def test_k_beyond_what_max_iter_steps_can_confirm_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"k=200 is invalid: k \+ smallest \(200\) must be below max_iter"):
        HessianSpectrum(k=200)
    with pytest.raises(ConfigError, match="k=99 is invalid"):
        HessianSpectrum(k=99, smallest=True)
    HessianSpectrum(k=99)


def test_trace_max_samples_below_the_first_stop_check_is_refused_at_construction():
    with pytest.raises(ConfigError, match="trace_max_samples=5 is invalid: must be an integer >= 10"):
        HessianSpectrum(trace_max_samples=5)
