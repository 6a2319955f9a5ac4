"""The saddle-free verdicts and the input-curvature figure, from a synthetic sweep."""

from __future__ import annotations

import report
from tests.test_report import record, write


def saddle_record(b, seed, activation, frac, top, robust, converged=1.0):
    r = record(b, seed, 10.0, 0.95, adv={"adv/pgd_linf/eps0.1": robust})
    r["config"]["model"] = {"_target_": "lightning_modules.models.lenet", "activation": activation}
    r["final"] |= {
        "input/clean/frac_negative": frac, "input/clean/top_mean": top,
        "input/pgd_eps0.1/frac_negative": frac, "input/pgd_eps0.1/top_mean": 3 * top,
        "input/converged": converged,
    }  # fmt: skip
    return r


def test_relu_holds_softplus_fails_and_unconverged_or_single_seeds_are_untestable(tmp_path):
    recs = {}
    for seed in (0, 1, 2):
        recs[f"relu_32_{seed}"] = saddle_record(32, seed, "relu", 0.0, 0.5, 0.8)
        recs[f"relu_256_{seed}"] = saddle_record(256, seed, "relu", 0.0, 1.5, 0.6)
        recs[f"soft_32_{seed}"] = saddle_record(32, seed, "softplus", 0.4 + 0.1 * seed, 0.6, 0.7)
        # one seed negative, two not: mixed
        recs[f"soft_256_{seed}"] = saddle_record(256, seed, "softplus", 0.1 if seed == 0 else 0.0, 2.0, 0.5)
    recs["relu_64_0"] = saddle_record(64, 0, "relu", 0.0, 1.0, 0.7)  # one seed only
    recs["relu_64_1"] = saddle_record(64, 1, "relu", 0.3, 1.0, 0.7, converged=0.0)  # not counted
    sweep = tmp_path / "sweep"
    write(sweep, list(recs.values()))
    assert report.main([str(sweep)]) == 0
    import pandas as pd

    table = pd.read_csv(sweep / "report" / "verdicts.csv")
    sf = table[table["kind"] == "saddle_free"]

    def verdict(metric, activation, b=None):
        sel = (sf["metric"] == metric) & (sf["activation"] == activation)
        if b is not None:
            sel &= sf["batch_size"] == b
        (v,) = sf.loc[sel, "verdict"]
        return v

    assert verdict("frac_negative clean", "relu", 32) == "holds"
    assert verdict("frac_negative pgd_eps0.1", "relu", 256) == "holds"
    assert verdict("frac_negative clean", "softplus", 32) == "fails"
    assert verdict("frac_negative clean", "softplus", 256) == "mixed"
    assert verdict("frac_negative clean", "relu", 64) == "untestable"  # the unconverged seed is left out
    assert verdict("input_lambda_max clean", "relu") == "rises"  # 0.5 -> 1.5 at B 32 -> 256
    assert (sweep / "report" / "input_curvature.png").stat().st_size > 10_000
    assert "activation" in pd.read_csv(sweep / "report" / "runs.csv")


def test_batch_size_verdicts_do_not_mix_activations(tmp_path):
    recs = [saddle_record(b, s, act, 0.0, 1.0, robust) for s in (0, 1)
            for act, b, robust in (("relu", 32, 0.8), ("relu", 256, 0.5), ("softplus", 32, 0.6), ("softplus", 256, 0.6))]  # fmt: skip
    sweep = tmp_path / "sweep"
    write(sweep, recs)
    assert report.main([str(sweep)]) == 0
    import pandas as pd

    table = pd.read_csv(sweep / "report" / "verdicts.csv")
    robust = table[(table["kind"] == "batch_size") & (table["metric"] == "robust_acc")]
    # ReLU loses 30 points from B=32 to B=256, softplus none: two verdicts, not one blurred mean
    assert dict(zip(robust["activation"], robust["verdict"], strict=True)) == {
        "relu": "falls",
        "softplus": "flat",
    }
