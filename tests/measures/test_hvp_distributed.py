"""Forward-over-reverse products and the timed choice of mode on a 2-process gloo group: the
1-process product of the union of the shards, bit for bit the same on both ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from measures.hessian import HessianOperator, fastest_hvp
from tests.helpers import run_in_process_group
from tests.measures.test_hessian_distributed import build

pytestmark = pytest.mark.slow  # spawns two processes

LOSS = nn.CrossEntropyLoss()


def vectors(dim: int) -> torch.Tensor:
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def products(batches) -> dict:
    model, _, _ = build()
    op = HessianOperator(model, LOSS, batches, hvp="forward_over_reverse")
    vs = vectors(op.dim)
    choice = fastest_hvp(model, LOSS, batches)
    return {"matvec": op.matvec(vs[:, 0]), "matmat": op.matmat(vs), "mode": choice.mode, "ms": choice.ms}


def worker(rank: int, world: int) -> dict:
    _, x, y = build()
    # unequal shards: 4 + 5 samples on rank 0, 6 on rank 1; and a rank with only an empty batch
    unequal = [(x[:4], y[:4]), (x[4:9], y[4:9])] if rank == 0 else [(x[9:], y[9:])]
    empty = [(x, y)] if rank == 0 else [(x[:0], y[:0])]
    return {"unequal": products(unequal), "empty": products(empty)}


def test_two_ranks_give_the_one_process_product_and_the_same_choice():
    ranks = run_in_process_group(worker)
    model, x, y = build()
    db = HessianOperator(model, LOSS, [(x, y)], cache=True)
    ref = db.matmat(vectors(db.dim))
    for case in ("unequal", "empty"):
        r0, r1 = ranks[0][case], ranks[1][case]
        assert torch.equal(r0["matvec"], r1["matvec"]) and torch.equal(r0["matmat"], r1["matmat"]), case
        assert (r0["mode"], r0["ms"]) == (r1["mode"], r1["ms"]), case
        assert torch.allclose(r0["matmat"], ref, rtol=1e-10, atol=1e-12), case
        assert torch.allclose(r0["matvec"], ref[:, 0], rtol=1e-10, atol=1e-12), case
