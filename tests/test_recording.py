"""refimpl.recording: every recording carries device, date, versions and command."""

from __future__ import annotations

import json

import pytest

from refimpl.recording import provenance, write_recording


def test_provenance_names_device_date_versions_and_command() -> None:
    record = provenance("python benchmarks/bench_x.py --quick")
    assert set(record) == {"device", "date", "versions", "command"}
    assert record["command"] == "python benchmarks/bench_x.py --quick"
    assert record["date"].endswith("+00:00") and record["device"]
    assert {"python", "torch"} <= set(record["versions"])


def test_write_recording_round_trips_and_refuses_a_record_without_provenance(tmp_path) -> None:
    record = {**provenance("python bench.py"), "rows": [{"n": 1, "ms": 2.5}]}
    path = write_recording(tmp_path / "sub" / "r.json", record)
    assert json.loads(path.read_text()) == record
    with pytest.raises(ValueError, match=r"missing \['device', 'date', 'versions', 'command'\]"):
        write_recording(tmp_path / "bad.json", {"rows": []})
    with pytest.raises(ValueError, match="command must be"):
        provenance("  ")
