"""Report stage: ``run_dir/report/index.html`` (with ``thumbs/`` and ``charts/``) and ``run_dir/summary.json``.

Reads every table the other stages wrote and the stats files; a stage that did not run is said to be missing on
the page and is None in the summary. The summary is also kept as ``run_dir/history/<run_id>/summary.json``, so
``clipaudit diff RUN_DIR@RUN_ID RUN_DIR`` can compare a later run with this one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from clipaudit.io import fs
from clipaudit.records import StageStats
from clipaudit.report.summary import SUMMARY_FILE, RunView, build_summary, history_path
from clipaudit.runs import current_run_id

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.report")

STAGE = "report"
REPORT_DIR = "report"
INDEX = "index.html"


def report_path(run_dir: str) -> str:
    """``run_dir/report/index.html``."""
    return fs.join(run_dir, REPORT_DIR, INDEX)


def run_report(config: Config, tables: RunTables, run_id: str | None = None) -> StageStats:
    """Write the report and the summary of ``config.run_dir``; returns counts and timings."""
    from clipaudit.report.render import ReportBuilder, unused_thumbs

    stats = StageStats(STAGE)
    started = time.perf_counter()
    run_id = run_id or current_run_id(config.run_dir)
    view = RunView(config.run_dir, tables=tables)
    summary = build_summary(view, run_id)
    summary["stages"][STAGE] = {"ran": True, "output": True, "seconds": None, "summary": "this report"}
    stats.add_time("summary", time.perf_counter() - started)

    phase = time.perf_counter()
    report_dir = fs.join(config.run_dir, REPORT_DIR)
    builder = ReportBuilder(view, summary, config.report, report_dir, config.tcac.params, config.embed.max_pixels)
    text = builder.build()
    stats.add_time("render", time.perf_counter() - phase)

    phase = time.perf_counter()
    path = report_path(config.run_dir)
    fs.write_text(path, text)
    fs.write_json(fs.join(config.run_dir, SUMMARY_FILE), summary)
    if run_id:
        fs.write_json(history_path(config.run_dir, run_id), summary)
    stale = unused_thumbs(report_dir, builder.thumbs.files())
    for old in stale:
        os.remove(old)
    stats.add_time("write", time.perf_counter() - phase)

    missing = [stage for stage, info in summary["stages"].items() if stage != STAGE and not info["ran"]]
    stats.counts.update(thumbnails=builder.thumbs.made, thumbnails_failed=len(builder.thumbs.failed),
                        thumbnail_bytes=builder.thumbs.bytes_written, charts=len(builder.charts),
                        html_bytes=len(text.encode()), stale_thumbnails_removed=len(stale))
    stats.notes.update(run_id=run_id, report=path, missing_stages=missing, random_models=summary["random_models"],
                       summary=f"report: {path} ({len(text.encode()) / 1024:.0f} KiB, {builder.thumbs.made} "
                               f"thumbnails, {len(builder.charts)} charts)"
                               + (f"; missing stages: {', '.join(missing)}" if missing else ""))
    stats.add_time("wall", time.perf_counter() - started)
    log.info("%s", stats.notes["summary"])
    return stats
