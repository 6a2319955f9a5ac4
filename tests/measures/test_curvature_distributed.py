"""GGN, empirical Fisher, MC Fisher and per-layer blocks on a 2-process gloo group equal the
1-process result on the union of the shards (unequal shards, one rank empty), bitwise on both ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from measures.blocks import block_spectra, parameter_blocks
from measures.curvature import curvature_operator
from measures.estimators import hutchpp_trace
from measures.linalg import lanczos_eigenvalues
from tests.helpers import run_in_process_group
from tests.measures.test_hessian_distributed import N, build


def measure(model, batches):
    out = {}
    for name in ("ggn", "ef", "fisher", "functional"):
        op = curvature_operator(name, model, nn.CrossEntropyLoss(), batches, mc_samples=2, seed=3)
        eig = lanczos_eigenvalues(op, 2, tol=1e-10)
        tr = hutchpp_trace(op, sketch=4, min_samples=6, max_samples=6, seed=1)
        out[name] = torch.cat([eig.eigenvalues, torch.tensor([tr.trace, float(eig.n_hvp)])])
    op = curvature_operator("hessian", model, nn.CrossEntropyLoss(), batches)
    blocks = block_spectra(op, parameter_blocks(model, "module"), tol=1e-10, trace=True, max_samples=20)
    out["blocks"] = torch.tensor([[v["lambda_1"], v["trace"], v["n_hvp"]] for v in blocks.values()])
    return out


def worker(rank: int, world: int) -> dict:
    model, x, y = build()
    idx = torch.arange(N)
    unequal = (
        [(x[:4], y[:4], idx[:4]), (x[4:9], y[4:9], idx[4:9])] if rank == 0 else [(x[9:], y[9:], idx[9:])]
    )
    empty = [(x, y, idx)] if rank == 0 else [(x[:0], y[:0], idx[:0])]
    return {"unequal": measure(model, unequal), "empty": measure(model, empty)}


@pytest.fixture(scope="module")
def ranks():
    return run_in_process_group(worker)


def test_two_ranks_equal_one_process(ranks):
    torch.set_num_threads(1)
    model, x, y = build()
    idx = torch.arange(N)
    ref = measure(model, [(x[:7], y[:7], idx[:7]), (x[7:], y[7:], idx[7:])])
    for split in ("unequal", "empty"):
        r0, r1 = ranks[0][split], ranks[1][split]
        for key, value in ref.items():
            assert torch.equal(r0[key], r1[key]), (split, key)
            assert torch.allclose(r0[key], value, rtol=1e-7, atol=1e-12), (split, key, r0[key], value)
