"""Run ids and the run log: every pipeline invocation over a run directory is one *run*.

A run gets an id when it starts (:func:`new_run_id`: a UTC timestamp and a short random suffix, e.g.
``20261124T171547Z-3fa2c1``, sortable and valid as a LanceDB tag). Each run keeps its own record,
``run_dir/runs/<run_id>.json``, holding its events (``started``, then ``finished`` or ``failed``); only that run
writes it, each time whole (one object put on an object store, temp file and rename on a local disk), so runs
that share a run directory, even at the same time, never lose each other's events. Run directories written
before this layout keep their ``run_dir/runs.jsonl`` (one event per line): it is still read, before the records.
When a run finishes, the current version of every table in ``run_dir/lancedb`` is tagged with the run id
(:meth:`clipaudit.io.tables.RunTables.tag_all`), so the tables as that run left them can be read back later with
``RunTables.read(name, version=run_id)``, even after later runs in the same run directory changed them (nightly
audits re-run one run directory).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from clipaudit.io import fs

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.runs")

RUNS_DIR = "runs"
"""The folder of per-run records (``<run_id>.json``) in ``run_dir``."""
LEGACY_RUNS_FILE = "runs.jsonl"
"""The run log of older run directories, one JSON event per line; read, never written."""


def new_run_id(now: datetime | None = None) -> str:
    """A new run id: ``YYYYmmddTHHMMSSZ-xxxxxx`` (UTC, then 6 random hex digits)."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def _event(kind: str, run_id: str, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "run_id": run_id, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "at_ns": time.time_ns(), **fields}


def record_path(run_dir: str, run_id: str) -> str:
    """Where run ``run_id`` keeps its record."""
    return fs.join(run_dir, RUNS_DIR, f"{run_id}.json")


def read_runs(run_dir: str) -> list[dict[str, Any]]:
    """Every run event of ``run_dir``, oldest first: those of a legacy ``runs.jsonl`` in file order, then those of
    the per-run records by time. Empty when nothing was recorded; unreadable lines and records are skipped."""
    events = _legacy_events(run_dir)
    recorded = [event for path in _record_files(run_dir) for event in _record_events(path)]
    recorded.sort(key=lambda e: (int(e.get("at_ns") or 0), str(e["run_id"])))
    return events + recorded


def _legacy_events(run_dir: str) -> list[dict[str, Any]]:
    path = fs.join(run_dir, LEGACY_RUNS_FILE)
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


def _record_files(run_dir: str) -> list[str]:
    """Paths (or URIs) of the ``*.json`` records under ``run_dir/runs`` (temp files of a write in progress are
    not records)."""
    folder = fs.join(run_dir, RUNS_DIR)
    if fs.is_remote(folder):
        filesystem, inner = pafs.FileSystem.from_uri(folder)
        prefix = folder.split("://", 1)[0] + "://"
    else:
        filesystem, inner, prefix = pafs.LocalFileSystem(), os.path.abspath(folder), ""
    if filesystem.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(prefix + info.path for info in infos
                  if info.type == pafs.FileType.File and posixpath.basename(info.path).endswith(".json"))


def _record_events(path: str) -> list[dict[str, Any]]:
    try:
        record = fs.read_json(path)
    except (OSError, ValueError):
        log.warning("run record %s cannot be read; skipped", path)
        return []
    events = record.get("events") if isinstance(record, dict) else None
    return [e for e in events or [] if isinstance(e, dict) and "run_id" in e]


def _record(run_dir: str, event: dict[str, Any]) -> None:
    """Add ``event`` to its run's record (read and rewritten whole: only this run writes it)."""
    path = record_path(run_dir, event["run_id"])
    events = _record_events(path) if fs.exists(path) else []
    fs.write_json(path, {"run_id": event["run_id"], "events": [*events, event]})


def start_run(run_dir: str, stages: Iterable[str], run_id: str | None = None) -> str:
    """Record that a run of ``stages`` starts; returns its run id."""
    run_id = run_id or new_run_id()
    _record(run_dir, _event("started", run_id, stages=list(stages)))
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
    event = _event(status, run_id, tags=tags, written=written, **({"error": error} if error else {}))
    _record(run_dir, event)
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
