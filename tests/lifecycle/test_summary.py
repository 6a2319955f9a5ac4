"""The console summary: an unconverged measurement is marked where its numbers are printed."""

from __future__ import annotations

from pathlib import Path

from lifecycle.summary import summarize

CONFIG = {"callbacks": {"hessian": {"tol": 1e-4, "trace_rtol": 0.05}}}


def hessian_line(record: dict) -> str:
    (line,) = [x for x in summarize(record, Path("run")).splitlines() if x.startswith("[train] Hessian")]
    return line


def test_an_unconverged_final_spectrum_is_marked_with_its_error_and_tol():
    final = {"hessian/lambda_1": 0.0001437, "hessian/rel_error": 209.0, "hessian/converged": 0.0}
    line = hessian_line({"config": CONFIG, "final": final})
    assert line.startswith("[train] Hessian (UNCONVERGED: rel_error 209 > tol 0.0001): lambda_1 0.0001437")
    ok = {**final, "hessian/rel_error": 1e-5, "hessian/converged": 1.0}
    assert hessian_line({"config": CONFIG, "final": ok}).startswith("[train] Hessian: lambda_1")


def test_an_unconverged_trace_is_marked_and_earlier_unconverged_rows_are_listed():
    final = {"hessian/lambda_1": 1.0, "hessian/rel_error": 1e-5, "hessian/converged": 0.0,
             "hessian/trace": 3.0, "hessian/trace_stderr": 0.5, "hessian/trace_converged": 0.0}  # fmt: skip
    rows = [{"step": 9, "epoch": 1, "prefix": "hessian", "rel_error": 0.3}]
    text = summarize({"config": CONFIG, "final": final, "unconverged": rows}, Path("run"))
    assert "[train] Hessian (UNCONVERGED: trace stderr 0.5 > trace_rtol 0.05 x |trace|): " in text
    assert "[train] UNCONVERGED hessian measurements at epoch(s) 1" in text


def test_non_finite_values_as_the_record_writes_them_are_printed_not_a_traceback():
    record = {"status": "diverged", "stop_reason": "diverged", "wall_time_s": "nan",
              "final": {"train_eval/loss": "nan", "hessian/lambda_1": "inf", "hessian/trace": "nan",
                        "adv/pgd_linf/eps0.1": "nan"}}  # fmt: skip
    text = summarize(record, Path("/runs/x"))
    assert "train loss nan" in text and "lambda_1 inf" in text and "trace nan" in text
    assert "0.1:nan" in text and "nan s" in text


def test_the_data_path_that_ran_is_printed_when_the_record_has_it():
    def data_lines(record):
        return [x for x in summarize(record, Path("run")).splitlines() if x.startswith("[train] data:")]

    assert data_lines({"data_on_device": True}) == ["[train] data: gathered on the device (data.on_device)"]
    assert data_lines({"data_on_device": False}) == ["[train] data: DataLoader batches (data.on_device off)"]
    assert data_lines({}) == []  # a record from before the field existed
