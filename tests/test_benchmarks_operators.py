"""``benchmarks/operators.py`` parses its arguments and runs end to end at ``--tiny`` (~10 s)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from tests.helpers import ROOT


@pytest.fixture
def bench():
    """The benchmark as a module; the path entry and the helper modules it imports are undone after."""
    path, saved = list(sys.path), {name: sys.modules.get(name) for name in ("hessian", "machine")}
    spec = importlib.util.spec_from_file_location("bench_operators", ROOT / "benchmarks" / "operators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old


def test_arguments(bench):
    args = bench.parse_args(["--samples", "64", "--channels", "8", "--rtol", "0.05", "--threads", "1"])
    assert (args.samples, args.channels, args.rtol, args.threads, args.skip) == (64, 8, 0.05, 1, None)
    tiny = bench.parse_args(["--tiny", "--skip", "ggn"])
    assert (tiny.samples, tiny.channels, tiny.repeats, tiny.trace_samples, tiny.skip) == (32, 4, 1, 20, "ggn")
    for bad in (["--rtol", "0"], ["--trace-samples", "3"], ["--skip", "power"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_tiny_run(bench, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        ratios = bench.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "machine:" in out and "GGN top-5" in out and "Hessian trace" in out
    assert set(ratios) == {
        "ggn_cl0.001",
        "ggn_cl0",
        "trace_hutchinson",
        "trace_hutchinson_equal_se",
        "trace_hutchpp",
        "trace_hutchpp_equal_se",
    }
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
