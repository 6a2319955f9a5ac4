"""The record's writers: the file is as readable as any file the user writes (a temporary file made
by ``mkstemp`` starts private), and a write leaves no temporary file behind."""

from __future__ import annotations

import os
import stat

import pytest

from lifecycle.record import update_record, write_record


def test_a_written_record_has_the_permissions_of_an_ordinary_file(tmp_path):
    ordinary = tmp_path / "ordinary.json"
    ordinary.write_text("{}")
    record = tmp_path / "results.json"
    write_record(record, {"status": "running"})
    update_record(record, stop_reason="max_epochs")
    mode = stat.S_IMODE(os.stat(record).st_mode)
    assert mode == stat.S_IMODE(os.stat(ordinary).st_mode) and mode & stat.S_IRGRP, oct(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ordinary.json",
        "results.json",
        "results.json.lock",
    ]


def test_data_on_device_is_true_or_false():
    from lifecycle.record import RecordError, check_record

    assert check_record({"status": "running", "data_on_device": True})["data_on_device"] is True
    with pytest.raises(RecordError, match="data_on_device"):
        check_record({"status": "running", "data_on_device": "yes"})
