"""Where train.py writes: inside the log directory whatever the overrides say, one directory per job."""

from __future__ import annotations

import pytest

from tests.helpers import NO_MEASURE, records, run_train

pytestmark = pytest.mark.slow

TINY = [*NO_MEASURE, "model=mlp", "trainer.max_steps=1", "threads=1"]


def _files_outside(root, log_dir) -> list:
    return [p for p in root.rglob("*") if p.is_file() and log_dir not in p.parents]


def test_an_experiment_name_with_dots_and_slashes_stays_inside_the_log_dir(tmp_path):
    log_dir = tmp_path / "a" / "b" / "logs"  # ../../x from logs/sweeps would be tmp_path/a/b/x
    run_train(["-m", "experiment_name=../../x", *TINY], log_dir)
    assert _files_outside(tmp_path, log_dir) == []
    (sweep,) = (log_dir / "sweeps").iterdir()
    assert sweep.name == "%2E.%2F..%2Fx" and (sweep / "multirun.yaml").exists()
    (rec,) = records(sweep).values()
    assert rec["status"] == "completed" and rec["config"]["experiment_name"] == "../../x"


def test_note_a_slash_b_and_a_underscore_b_get_two_run_directories(tmp_path):
    for note in ("a/b", "a_b"):
        run_train([*TINY, f"+note={note}"], tmp_path)
    recs = records(tmp_path)
    assert len(recs) == 2 and all(r["status"] == "completed" for r in recs.values())
    assert {r["config"]["note"] for r in recs.values()} == {"a/b", "a_b"}
    assert {name.split(",")[0] for name in recs} == {"+note=a%2Fb", "+note=a_b"}
    assert all(p.parent.parent == tmp_path / "runs" for p in tmp_path.rglob("results.json"))
