"""The run log: concurrent runs in one run_dir lose no record, and older run directories' runs.jsonl still reads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from clipaudit.runs import (
    LEGACY_RUNS_FILE,
    current_run_id,
    finish_run,
    finished_runs,
    previous_run_id,
    read_runs,
    start_run,
)

RUNS_PER_PROCESS = 15

_WORKER = """
import sys, time
from pathlib import Path
from clipaudit.runs import finish_run, start_run
run_dir, go, name, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
for i in range(n):
    run_id = start_run(run_dir, ["ingest"], run_id=f"20260101T000000Z-{name}{i:03d}")
    finish_run(run_dir, run_id, None, {}, status="failed" if i % 5 == 4 else "finished")
"""


def test_two_concurrent_processes_lose_no_run(tmp_path: Path) -> None:
    run_dir, go = tmp_path / "run", tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(run_dir), str(go), name, str(RUNS_PER_PROCESS)])
               for name in ("a", "b")]
    time.sleep(1.0)
    go.touch()
    assert [w.wait(timeout=120) for w in workers] == [0, 0]

    events = read_runs(str(run_dir))
    expected = {f"20260101T000000Z-{name}{i:03d}" for name in "ab" for i in range(RUNS_PER_PROCESS)}
    assert {e["run_id"] for e in events if e["event"] == "started"} == expected
    failed = {e["run_id"] for e in events if e["event"] == "failed"}
    assert failed == {f"20260101T000000Z-{name}{i:03d}" for name in "ab" for i in range(4, RUNS_PER_PROCESS, 5)}
    assert set(finished_runs(str(run_dir))) == expected - failed
    assert len(events) == 2 * len(expected)
    assert not (run_dir / LEGACY_RUNS_FILE).exists()


def test_a_legacy_runs_jsonl_is_read_before_the_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    legacy = [{"event": "started", "run_id": "20250101T000000Z-aaaaaa", "at": "2025-01-01T00:00:00+00:00"},
              {"event": "finished", "run_id": "20250101T000000Z-aaaaaa", "tags": {}, "written": []},
              {"event": "started", "run_id": "20250102T000000Z-bbbbbb"},
              {"event": "failed", "run_id": "20250102T000000Z-bbbbbb", "error": "KeyboardInterrupt"}]
    text = "\n".join(json.dumps(e) for e in legacy) + "\nnot json\n"
    (run_dir / LEGACY_RUNS_FILE).write_text(text)

    new = start_run(str(run_dir), ["ingest"])
    assert current_run_id(str(run_dir)) == new
    finish_run(str(run_dir), new, None, {})

    assert finished_runs(str(run_dir)) == ["20250101T000000Z-aaaaaa", new]
    assert previous_run_id(str(run_dir)) == "20250101T000000Z-aaaaaa"
    assert [e["event"] for e in read_runs(str(run_dir))] == ["started", "finished", "started", "failed",
                                                            "started", "finished"]
    assert (run_dir / LEGACY_RUNS_FILE).read_text() == text


def test_runs_are_ordered_by_time_not_by_id(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    later_id_first = start_run(run_dir, ["ingest"], run_id="20260101T000000Z-ffffff")
    earlier_id_second = start_run(run_dir, ["ingest"], run_id="20260101T000000Z-000000")
    assert current_run_id(run_dir) == earlier_id_second
    finish_run(run_dir, earlier_id_second, None, {})
    finish_run(run_dir, later_id_first, None, {})
    assert finished_runs(run_dir) == [earlier_id_second, later_id_first]
