"""Records read defensively: a damaged or misshapen ``results.json`` is noted (file and field
named) and skipped, never a traceback and never a wrong number; a "nan" where a number belongs is NaN."""

from __future__ import annotations

import copy
import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import report
from lifecycle.record import SCHEMA
from reporting import figures
from reporting.runs import load_runs, tidy


def realistic_record() -> dict:
    """A completed run's record with every top-level field of the schema, as the lifecycle writes it."""
    final = {
        "train_eval/acc": 0.981,
        "train_eval/loss": 0.06,
        "test/acc": "nan",  # the record writes a NaN as the string "nan"
        "test/loss": 0.2,
        "hessian/lambda_1": 42.0,
        "hessian/converged": 1.0,
        "adv/pgd_linf/eps0.1": 0.55,
    }
    return {
        "status": "completed",
        "overrides": ["optimizer.batch_size=64", "seed=0"],
        "config": {
            "experiment_name": "fuzz",
            "seed": 0,
            "model": {"_target_": "lightning_modules.nets.LeNet"},
            "data": {"name": "mnist"},
            "optimizer": {
                "batch_size": 64,
                "lr_rule": "fixed",
                "lr": 0.01,
                "lr_ratio": None,
                "momentum": 0.9,
            },
            "adversarial_training": {"enabled": False},
            "callbacks": {"training_target": {"target_train_acc": 0.97, "target_train_loss": None}},
        },
        "identity": {"training": {"optimizer.lr": 0.01}, "measurement": {}, "code": "0123abcd"},
        "batch_plan": {"global_batch": 64, "world_size": 1, "per_device": 64, "micro_batch": 64},
        "provenance": {"commit": "0123abcd", "torch": "2.14.1", "machine": "cpu"},
        "resumed_from": None,
        "data_on_device": False,
        "hessian_products": {"batch_size": 250, "hvp": "double_backward", "hvp_ms_double_backward": 4.0},
        "accepted_code_changes": [],
        "error": None,
        "traceback": None,
        "segments": [
            {"started_at": "2025-01-01T00:00:00", "from_step": 0, "wall_time_s": 12.0, "ended": "completed"}
        ],
        "wall_time_s": "nan",
        "history": [
            {
                "step": 9,
                "epoch": 0,
                "hessian/lambda_1": 30.0,
                "train_eval/acc": 0.9,
                "hessian/converged": 1.0,
            },
            {"step": 19, "epoch": 1, "hessian/lambda_1": 42.0, "train_eval/acc": 0.981, "test/acc": "nan"},
        ],
        "last": {"hessian/lambda_1": 42.0, "train_eval/acc": 0.981, "test/acc": "nan"},
        "last_step": {"hessian/lambda_1": 19, "train_eval/acc": 19, "test/acc": 19},
        "unconverged": [],
        "stop_reason": "target_train_acc",
        "stopped_at_step": 20,
        "stopped_at_epoch": 2,
        "final": final,
        "final_step": {"hessian/lambda_1": 19},
        "time_split": {"training": 10.0, "hessian": 2.0},
    }


MISSING = object()
VARIANTS = {"null": None, "list": [1, "x"], "string": "x", "number": 7, "missing": MISSING}


def test_the_realistic_record_covers_the_schema_and_reads_nan_strings_as_nan(tmp_path):
    rec = realistic_record()
    assert set(SCHEMA) <= set(rec)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text(json.dumps(rec))
    runs, notes = load_runs(tmp_path)
    assert notes == []
    row = tidy(runs).iloc[0]
    assert math.isnan(row["test/acc"]) and math.isnan(row["wall_time_s"]) and row["hessian/lambda_1"] == 42.0
    assert row["reached_target"] and pd.isna(row["unconverged"])


def test_every_field_replaced_by_a_wrong_kind_is_read_or_noted_by_name_never_raised(
    tmp_path, capsys, monkeypatch
):
    """Every top-level field in turn as null, a list, a string, a number and missing (and whole files
    of the wrong shape), all in one sweep through ``report.main``: figures are drawn but not saved."""
    monkeypatch.setattr(figures, "save", lambda fig, path, rect=None: plt.close(fig))
    sweep = tmp_path / "sweep"
    cases = {}
    for field in SCHEMA:
        for kind, value in VARIANTS.items():
            rec = copy.deepcopy(realistic_record())
            if value is MISSING:
                del rec[field]
            else:
                rec[field] = value
            cases[f"{field.replace('_', '-')}--{kind}"] = (field, json.dumps(rec))
    whole = {"not-json": '{"status": "compl', "list": "[]", "null": "null", "string": '"x"', "number": "3"}
    for name, text in whole.items():
        cases[f"file--{name}"] = (None, text)
    for job, (_, text) in cases.items():
        (sweep / job).mkdir(parents=True)
        (sweep / job / "results.json").write_text(text)

    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0  # never a traceback
    printed = capsys.readouterr().out
    notes = [line.removeprefix("[report] note: ") for line in printed.splitlines() if "note:" in line]
    read = set(pd.read_csv(out / "runs.csv")["job"])
    for job, (field, _) in cases.items():
        path = sweep / job / "results.json"
        noted = [n for n in notes if f"unreadable record {path} (" in n]
        if job in read:
            assert not noted, (job, noted)
            continue
        assert len(noted) == 1, (job, notes)
        if field is not None:
            assert f"'{field}'" in noted[0] or f" {field}" in noted[0], (job, noted[0])
    # what must be refused is refused, what may be absent is read
    for job in ("final--null", "final--list", "wall-time-s--string", "identity--string", "status--missing"):
        assert job not in read, job
    for job in ("traceback--missing", "resumed-from--null", "unconverged--missing", "time-split--null"):
        assert job in read, job
    assert not any(job.startswith("file--") for job in read)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"status": "completed"}'])
def test_a_whole_file_of_the_wrong_shape_is_one_note(tmp_path, text):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text(text)
    runs, notes = load_runs(tmp_path)
    assert runs == [] and len(notes) == 1 and str(tmp_path / "job" / "results.json") in notes[0]
