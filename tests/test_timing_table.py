"""The README's timing table is the one generated from benchmarks/results/, one row per measurement."""

from __future__ import annotations

import json

import pytest
from repo_scripts import load_script

tt = load_script("scripts/timing_table.py")


def test_readme_table_is_the_generated_one():
    assert tt.main(["--check"]) == 0


def test_a_new_measurement_replaces_its_row_and_check_catches_a_stale_readme(tmp_path, monkeypatch):
    results = tmp_path / "results" / "cpu-2core"
    results.mkdir(parents=True)
    row = {"target": "run", "command": "make run PRESET=smoke", "seconds": 500.0, "exit_code": 0, "pytest_summary": None}
    record = {"date": "2026-12-07 10:00:00 UTC", "commit": "a" * 40,
              "rows": [{**row, "rev": "old", "commit": "b" * 40}, {**row, "rev": "HEAD", "seconds": 250.0, "commit": "c" * 40}]}
    (results / "make_timings.json").write_text(json.dumps(record))
    text = tt.table(tmp_path / "results")
    assert text.count("\n| `make run`") == 1  # one row, both commits in it
    assert "8 min 20 s at bbbbbbb (ok); 4 min 10 s at ccccccc (ok); **2.0x**" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tt.BEGIN}\nold table\n{tt.END}\nafter\n")
    monkeypatch.setattr(tt, "README", readme)
    monkeypatch.setattr(tt, "RESULTS", tmp_path / "results")
    assert tt.main(["--check"]) == 1
    assert tt.main(["--write"]) == 0 and tt.main(["--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith(f"{tt.END}\nafter\n")
    record["rows"][1]["seconds"] = 200.0  # a new measurement: the row changes, no history is kept
    (results / "make_timings.json").write_text(json.dumps(record))
    assert tt.main(["--check"]) == 1
    tt.main(["--write"])
    assert "3 min 20 s at ccccccc" in readme.read_text() and "4 min 10 s" not in readme.read_text()


def test_a_readme_without_markers_is_refused(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    monkeypatch.setattr(tt, "README", readme)
    with pytest.raises(SystemExit, match="timings:begin"):
        tt.main(["--write"])
