"""Hessian functions on a 2-process gloo group equal the 1-process result on the union of shards
(a warm-started Lanczos included).

Each rank passes its own shard (unequal sizes, different batch sizes, or nothing at all); the
result must be that of all 15 samples, sample-weighted, and bit-for-bit equal on both ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from measures.hessian import hessian_density, hessian_eigenvalues, hessian_trace
from tests.helpers import run_in_process_group

N = 15


def build(seed: int = 0):
    """The same float64 conv net (BatchNorm in eval mode) and data in every process."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((N, 1, 6, 6), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def perturbed(model, seed: int = 3):
    """The next 'epoch': the same network with slightly moved weights."""
    g = torch.Generator().manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return moved


def measure(model, batches):
    loss_fn = nn.CrossEntropyLoss()
    eig = hessian_eigenvalues(model, loss_fn, batches, k=3, smallest=1, cache="auto", return_start=True)
    # a warm start from those Ritz vectors on the next 'epoch' (rank-identical start and steps)
    warm = hessian_eigenvalues(perturbed(model), loss_fn, batches, k=3, smallest=1, start=eig.start_vectors)
    eig_nc = hessian_eigenvalues(model, loss_fn, batches, k=3, smallest=1, cache=False)
    tr = hessian_trace(model, loss_fn, batches, rtol=0.05, max_samples=100, seed=5)
    dens = hessian_density(model, loss_fn, batches, n_steps=10, seed=2)
    return {
        "top": eig.eigenvalues,
        "smallest": eig.smallest,
        "n_hvp": eig.n_hvp,
        "top_nocache": eig_nc.eigenvalues,
        "warm_top": torch.cat([warm.eigenvalues, warm.smallest]),
        "warm_n_hvp": warm.n_hvp,
        "warm_errors": torch.cat([warm.errors, warm.smallest_errors]),
        "trace": tr.trace,
        "trace_n": tr.n_samples,
        "nodes": dens.nodes,
    }


def shard_worker(rank: int, world: int) -> dict:
    """Two splits of the 15 samples over the ranks (one process group, to spawn only once)."""
    model, x, y = build()
    # unequal: 9 samples as 4+5 on rank 0, 6 samples as one batch on rank 1
    unequal = [(x[:4], y[:4]), (x[4:9], y[4:9])] if rank == 0 else [(x[9:], y[9:])]
    # empty: everything on rank 0; rank 1 has one empty batch only
    empty = [(x[:8], y[:8]), (x[8:], y[8:])] if rank == 0 else [(x[:0], y[:0])]
    return {"unequal": measure(model, unequal), "empty": measure(model, empty)}


@pytest.fixture(scope="module")
def ranks():
    return run_in_process_group(shard_worker)


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, x, y = build()
    ref = measure(model, [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])])
    torch.set_num_threads(threads)
    return ref


def _check(results, ref):
    r0, r1 = results
    for key in r0:  # bitwise equal on both ranks
        a, b = r0[key], r1[key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert torch.allclose(r0["top"], ref["top"], rtol=1e-6, atol=0)
    assert torch.allclose(r0["top_nocache"], ref["top"], rtol=1e-6, atol=0)
    assert abs(float(r0["smallest"][0] - ref["smallest"][0])) <= 1e-6 * float(ref["top"][0])
    assert r0["trace_n"] == ref["trace_n"]
    assert abs(r0["trace"] - ref["trace"]) <= 1e-6 * abs(ref["trace"])
    assert torch.allclose(r0["nodes"], ref["nodes"], rtol=1e-6, atol=1e-9)
    # the warm start: the same number of steps and the same values as on one process
    assert r0["warm_n_hvp"] == ref["warm_n_hvp"]
    assert torch.allclose(r0["warm_top"], ref["warm_top"], rtol=0, atol=1e-9 * float(ref["top"][0]))


def test_two_ranks_equal_one_process(ranks, reference):
    _check([r["unequal"] for r in ranks], reference)


def test_rank_with_empty_shard(ranks, reference):
    _check([r["empty"] for r in ranks], reference)
