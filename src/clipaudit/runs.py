"""Run ids and the run log: every pipeline invocation over a run directory is one *run*.

A run gets an id when it starts (:func:`new_run_id`: a UTC timestamp and a short random suffix, e.g.
``20261124T171547Z-3fa2c1``, sortable and valid as a LanceDB tag). ``run_dir/runs.jsonl`` holds one line per
event (``started``, then ``finished`` or ``failed``). When a run finishes, the current version of every table in
``run_dir/lancedb`` is tagged with the run id (:meth:`clipaudit.io.tables.RunTables.tag_all`), so the tables as
that run left them can be read back later with ``RunTables.read(name, version=run_id)``, even after later runs
in the same run directory changed them (nightly audits re-run one run directory).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.runs")

RUNS_FILE = "runs.jsonl"
"""The run log, one JSON object per line, in ``run_dir``."""


def new_run_id(now: datetime | None = None) -> str:
    """A new run id: ``YYYYmmddTHHMMSSZ-xxxxxx`` (UTC, then 6 random hex digits)."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_runs(run_dir: str) -> list[dict[str, Any]]:
    """The events of ``run_dir/runs.jsonl`` in order (empty when there is no log); unreadable lines are skipped."""
    path = fs.join(run_dir, RUNS_FILE)
    if not fs.exists(path):
        return []
    events = []
    for line in fs.read_text(path).splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "run_id" in event:
            events.append(event)
    return events


def _append(run_dir: str, event: dict[str, Any]) -> None:
    """Append one event line (read and rewrite: object stores have no append)."""
    path = fs.join(run_dir, RUNS_FILE)
    text = fs.read_text(path) if fs.exists(path) else ""
    if text and not text.endswith("\n"):
        text += "\n"
    fs.write_text(path, text + json.dumps(event, sort_keys=True) + "\n")


def start_run(run_dir: str, stages: Iterable[str], run_id: str | None = None) -> str:
    """Record that a run of ``stages`` starts; returns its run id."""
    run_id = run_id or new_run_id()
    _append(run_dir, {"event": "started", "run_id": run_id, "at": _now(), "stages": list(stages)})
    return run_id


def finish_run(run_dir: str, run_id: str, tables: RunTables | None, versions_before: dict[str, int],
               status: str = "finished", error: str | None = None) -> dict[str, int]:
    """Tag the tables with ``run_id`` (when the run finished) and record the outcome; returns the tagged versions.

    ``versions_before`` are the table versions when the run started: the tables whose version moved are recorded
    as ``written`` by this run. Every table is tagged, written or not, so the tag is a snapshot of the whole
    database as this run left it.
    """
    tags: dict[str, int] = {}
    if tables is not None and status == "finished":
        tags = tables.tag_all(run_id)
    versions = tags or (tables.versions() if tables is not None else {})
    written = sorted(name for name, version in versions.items() if versions_before.get(name) != version)
    event: dict[str, Any] = {"event": status, "run_id": run_id, "at": _now(), "tags": tags, "written": written}
    if error:
        event["error"] = error
    _append(run_dir, event)
    return tags


def current_run_id(run_dir: str) -> str | None:
    """The id of the latest run started in ``run_dir`` (the one in progress while its stages run), or None."""
    started = [e["run_id"] for e in read_runs(run_dir) if e.get("event") == "started"]
    return started[-1] if started else None


def finished_runs(run_dir: str) -> list[str]:
    """Ids of the runs that finished (their tables are tagged), oldest first."""
    return [e["run_id"] for e in read_runs(run_dir) if e.get("event") == "finished"]


def previous_run_id(run_dir: str, before: str | None = None) -> str | None:
    """The finished run before ``before`` (default: before the latest finished run), or None."""
    finished = finished_runs(run_dir)
    if before is None:
        return finished[-2] if len(finished) >= 2 else None
    earlier = [run_id for run_id in finished if run_id < before]
    return earlier[-1] if earlier else None
