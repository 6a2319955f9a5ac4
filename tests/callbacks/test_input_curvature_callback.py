"""The input-curvature callback: one process and two gloo processes give the same numbers, and its
summaries are those of the per-example values computed directly."""

from __future__ import annotations

import torch
from torch import nn

from callbacks.input_curvature import InputCurvature
from measures.distributed import shard_for_rank
from measures.input_curvature import input_curvature
from tests.helpers import run_in_process_group

N = 7


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Softplus(), nn.Linear(12, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((N, 1, 4, 4), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def callback(**kw):
    return InputCurvature(batch_size=3, eps=[0.1], pgd_steps=2, along_path=True, trace=True, tol=1e-8, **kw)


def _measure_on_ranks(rank, world):
    model, x, y = build()
    pos = shard_for_rank(torch.arange(N), rank, world)
    return callback().measure(model, x[pos], y[pos], pos + 100, pos, N)


def test_two_processes_give_the_numbers_of_one():
    model, x, y = build()
    one = callback().measure(model, x, y, torch.arange(N) + 100, torch.arange(N), N)
    two = run_in_process_group(_measure_on_ranks)
    keys = [k for k in one if not k.endswith("/seconds")]
    assert set(one) == set(two[0]) == set(two[1])
    for k in keys:
        assert two[0][k] == two[1][k], k
        assert abs(two[0][k] - one[k]) <= 1e-12 * max(abs(one[k]), 1e-12), (k, one[k], two[0][k])
    assert one["input/converged"] == 1.0 and one["input/n_samples"] == N


def test_the_clean_summaries_are_those_of_the_per_example_values():
    model, x, y = build()
    cb = callback(neg_tol=1e-3)
    m = cb.measure(model, x, y, torch.arange(N), torch.arange(N), N)
    direct = input_curvature(model, x, y, torch.arange(N), k=1, tol=1e-8)
    assert abs(m["input/clean/top_mean"] - float(direct.top[:, 0].mean())) <= 1e-12
    assert abs(m["input/clean/top_median"] - float(direct.top[:, 0].median())) <= 1e-12
    # (batches of 3 here, of 7 there: products equal to rounding)
    assert abs(m["input/clean/min_lambda_min"] - float(direct.smallest.min())) <= 1e-12
    assert abs(m["input/clean/trace_mean"] - float(direct.trace.mean())) <= 1e-12
    frac = float((direct.smallest < -1e-3 * direct.top[:, 0].abs()).double().mean())
    assert m["input/clean/frac_negative"] == frac and frac > 0  # softplus: negative curvature
    assert {"input/pgd_eps0.1/top_mean", "input/pgd_eps0.1_path/frac_negative"} <= set(m)
