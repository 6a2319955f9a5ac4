"""measure.py's result names: one per checkpoint and effective settings (the runs themselves are slow tests)."""

from __future__ import annotations

from pathlib import Path

import measure

RUN = Path("/runs/a")
CALLBACKS = {
    "hessian": {"_target_": "x", "k": 3, "subset_size": 1000, "trace": False, "every_n_epochs": 1},
    "adversarial": {"_target_": "y", "eps": [0, 0.1], "pgd_steps": 10, "subset_size": 500},
}


def name(*argv: str, ckpt: Path = RUN / "checkpoints" / "last.ckpt", step: int = 100) -> str:
    args = measure.build_parser().parse_args([str(RUN), *argv])
    h, a = measure.callback_settings(CALLBACKS, args)
    return measure.result_name(ckpt, measure.measurement_settings(RUN, ckpt, step, args, h, a), args.tag)


def test_different_settings_get_different_names():
    names = [
        name(),
        name("--k", "2"),
        name("--float64"),
        name("--trace"),
        name("--attacks"),
        name("--no-hessian", "--attacks"),
        name("--no-hessian", "--attacks", "--pgd-steps", "3"),
        name("--no-hessian", "--attacks", "--full-test"),
        name("--no-hessian", "--attacks", "--no-nested-eps"),
        name("--no-hessian", "--attacks", "--final-attacks", "apgdce", "apgdt"),
        name("--no-hessian", "--attacks", "--final-attacks", "apgdce", "apgdt", "--apgd-steps", "20"),
        name(step=200),  # last.ckpt after more training: other weights
        name(ckpt=Path("/elsewhere/checkpoints/last.ckpt")),
        name(ckpt=RUN / "checkpoints" / "best-epoch3.ckpt"),
    ]
    assert len(set(names)) == len(names), names
    assert all(n.startswith("last-") for n in names[:-1]) and names[-1].startswith("best-epoch3-")


def test_the_same_settings_get_the_same_name():
    assert name() == name("--k", "3") == name("--subset", "1000")  # the run's own values, given explicitly
    assert name("--no-hessian", "--attacks") == name("--no-hessian", "--attacks", "--eps", "0", "0.1")
    assert name("--no-hessian", "--attacks") == name("--no-hessian", "--trace", "--k", "5", "--attacks")
    # a run made before nested eps (no nested_eps in its config) is re-measured nested, as given
    assert name("--no-hessian", "--attacks") == name("--no-hessian", "--attacks", "--nested-eps")
    # no APGD: APGD's settings (absent from runs made before them) do not change the name
    assert name("--no-hessian", "--attacks") == name("--no-hessian", "--attacks", "--final-attacks")
    assert name("--no-hessian", "--attacks") == name("--no-hessian", "--attacks", "--apgd-steps", "20")


def test_a_tag_is_part_of_the_name():
    tagged = name("--tag", "fp64 check")
    assert tagged.startswith("last-fp64_check-") and tagged.endswith(name().removeprefix("last-"))


def test_curvature_options_become_callback_arguments():
    from measure import build_parser, curvature_settings

    args = build_parser().parse_args(
        ["run", "--operator", "ggn", "--blocks", "module", "--trace-method", "hutchpp"]
    )
    assert curvature_settings(args) == {
        "operator": "ggn",
        "prefix": "ggn",
        "blocks": "module",
        "trace_method": "hutchpp",
    }
    args = build_parser().parse_args(["run", "--blocks", "conv", "fc"])
    assert curvature_settings(args) == {"blocks": ["conv", "fc"]}
    assert curvature_settings(build_parser().parse_args(["run"])) == {}  # old results keep their names
