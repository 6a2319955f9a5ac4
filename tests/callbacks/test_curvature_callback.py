"""HessianSpectrum with another operator (``operator``), per-layer blocks (``blocks``) and Hutch++, and the
``ggn`` callback config added beside the default Hessian by ``'callbacks=[default,ggn]'``."""

from __future__ import annotations

import hydra
import pytest
import torch
from torch import nn

from callbacks.hessian_spectrum import GGNSpectrum, HessianSpectrum
from lightning_modules.config import ConfigError
from tests.helpers import exact_hessian
from tests.measures.test_curvature import dense_ggn
from tests.measures.test_hessian import convnet, data


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    model = convnet()
    x, y, _ = data((1, 6, 6))
    return model, x, y


def test_ggn_with_blocks_and_hutchpp_equals_the_dense_matrix(problem):
    model, x, y = problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = HessianSpectrum(
        prefix="ggn", operator="ggn", blocks="module", trace=True, trace_method="hutchpp", tol=1e-10,
        trace_rtol=0.01, trace_max_samples=300, batch_size=6, k=2,
    )  # fmt: skip
    m = cb.measure(model, nn.functional.cross_entropy, x, y)
    ggn = dense_ggn(model, x)
    exact = torch.linalg.eigvalsh(ggn).flip(0)
    assert abs(m["ggn/lambda_1"] - float(exact[0])) <= 1e-8 * float(exact[0])
    assert abs(m["ggn/trace"] - float(ggn.trace())) <= 4 * m["ggn/trace_stderr"] + 1e-12
    offsets = {"0": (0, 20), "1": (20, 24), "5": (24, 51)}  # conv (18+2), BatchNorm (2+2), linear (24+3)
    for name, (a, b) in offsets.items():
        top = float(torch.linalg.eigvalsh(ggn[a:b, a:b])[-1])
        assert abs(m[f"ggn/layer/{name}/lambda_1"] - top) <= 1e-8 * float(exact[0]), name
        assert f"ggn/layer/{name}/trace" in m
    assert m["ggn/converged"] == 1.0 and m["ggn/layer_n_hvp"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the functional part: Hessian - GGN
    f = HessianSpectrum(prefix="functional", operator="functional", tol=1e-10, k=1).measure(
        model, nn.functional.cross_entropy, x, y
    )
    h = exact_hessian(model, nn.CrossEntropyLoss(), x, y)
    assert abs(f["functional/lambda_1"] - float(torch.linalg.eigvalsh(h - ggn)[-1])) <= 1e-8 * float(exact[0])


def test_bad_operator_blocks_and_trace_method_are_refused(problem):
    for kwargs, key in (
        ({"operator": "kfac"}, "operator"),
        ({"blocks": 3}, "blocks"),
        ({"trace_method": "x"}, "trace_method"),
    ):
        with pytest.raises(ConfigError, match=key):
            HessianSpectrum(**kwargs)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        HessianSpectrum(blocks={"fc": "fc"}).check_against(problem[0], None)


def test_ggn_config_adds_a_second_instance(compose):
    cfg = compose(["callbacks=[default,ggn]", "callbacks.ggn.k=2"])
    assert {"hessian", "ggn"} <= set(cfg.callbacks)
    hess = hydra.utils.instantiate(cfg.callbacks.hessian)
    ggn = hydra.utils.instantiate(cfg.callbacks.ggn)
    assert isinstance(ggn, GGNSpectrum) and ggn.k == 2
    assert (ggn.prefix, ggn.operator, ggn.blocks, ggn.trace) == ("ggn", "ggn", "module", True)
    assert (hess.prefix, hess.operator, hess.blocks, hess.trace) == ("hessian", "hessian", None, False)
    assert ggn.state_key != hess.state_key
