"""Report stage: ``run_dir/report/index.html`` (with ``thumbs/`` and ``charts/``) and ``run_dir/summary.json``.

Reads every table the other stages wrote and the stats files; a stage that did not run is said to be missing on
the page and is None in the summary. The summary is also kept as ``run_dir/history/<run_id>/summary.json``, so
``clipaudit diff RUN_DIR@RUN_ID RUN_DIR`` can compare a later run with this one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from clipaudit.io import fs
from clipaudit.records import StageStats
from clipaudit.report.summary import SUMMARY_FILE, build_summary, history_path
from clipaudit.run_view import RunView
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


def run_report(config: Config, tables: RunTables, stages: Sequence[str], run_id: str | None = None) -> StageStats:
    """Write the report and the summary of ``config.run_dir``; returns counts and timings. ``stages``: the
    pipeline's stage names, in order (the summary says of each whether it ran)."""
    from clipaudit.report.models import ModelsIndexBuilder
    from clipaudit.report.render import ReportBuilder, unused_thumbs

    stats = StageStats(STAGE)
    started = time.perf_counter()
    run_id = run_id or current_run_id(config.run_dir)
    view = RunView(config.run_dir, tables=tables)
    summary = build_summary(view, run_id, stages)
    for part in [summary, *(summary.get("per_model") or {}).values()]:
        part["stages"][STAGE] = {"ran": True, "output": True, "seconds": None, "summary": "this report"}
    stats.add_time("summary", time.perf_counter() - started)

    phase = time.perf_counter()
    report_dir = fs.join(config.run_dir, REPORT_DIR)
    pages: dict[str, str] = {}
    if summary.get("per_model"):
        builders, pages, html_bytes = _model_pages(config, view, summary, report_dir)
        index = ModelsIndexBuilder(view, summary, config.report, report_dir, pages, config.tcac.params,
                                   config.embed.max_pixels)
        text = index.build()
        builders.append(index)
    else:
        builder = ReportBuilder(view, summary, config.report, report_dir, config.tcac.params,
                                config.embed.max_pixels)
        text = builder.build()
        builders, html_bytes = [builder], 0
    html_bytes += len(text.encode())
    stats.add_time("render", time.perf_counter() - phase)

    phase = time.perf_counter()
    path = report_path(config.run_dir)
    fs.write_text(path, text)
    fs.write_json(fs.join(config.run_dir, SUMMARY_FILE), summary)
    if run_id:
        fs.write_json(history_path(config.run_dir, run_id), summary)
    stale = unused_thumbs(report_dir, set().union(*(b.thumbs.files() for b in builders)))
    for old in stale:
        os.remove(old)
    stale_pages = unused_model_pages(report_dir, set(pages.values()))
    for old in stale_pages:
        os.remove(old)
    stats.add_time("write", time.perf_counter() - phase)

    missing = [stage for stage, info in summary["stages"].items() if stage != STAGE and not info["ran"]]
    made = sum(b.thumbs.made for b in builders)
    charts = sum(len(b.charts) for b in builders)
    stats.counts.update(thumbnails=made, thumbnails_failed=sum(len(b.thumbs.failed) for b in builders),
                        thumbnail_bytes=sum(b.thumbs.bytes_written for b in builders), charts=charts,
                        html_bytes=html_bytes, stale_thumbnails_removed=len(stale))
    if pages:
        stats.counts.update(model_pages=len(pages), stale_model_pages_removed=len(stale_pages))
        stats.notes["model_pages"] = {spec: fs.join(report_dir, name) for spec, name in pages.items()}
    stats.notes.update(run_id=run_id, report=path, missing_stages=missing, random_models=summary["random_models"],
                       summary=f"report: {path} ({html_bytes / 1024:.0f} KiB, {made} thumbnails, {charts} charts"
                               + (f", {len(pages)} model pages" if pages else "") + ")"
                               + (f"; missing stages: {', '.join(missing)}" if missing else ""))
    stats.add_time("wall", time.perf_counter() - started)
    log.info("%s", stats.notes["summary"])
    return stats


def _model_pages(config: Config, view: RunView, summary: dict, report_dir: str) -> tuple[list, dict[str, str], int]:
    """Write the page of every CLIP-role model of a run of several (``report/model-<slug>.html``, the one-model
    report through the model's view); returns their builders, spec -> file name, and the bytes written."""
    from clipaudit.report.models import model_page, model_slug
    from clipaudit.report.render import ReportBuilder

    builders, pages, size = [], {}, 0
    for spec, model_summary in summary["per_model"].items():
        builder = ReportBuilder(view.for_clip_model(spec), model_summary, config.report, report_dir,
                                config.tcac.params, config.embed.max_pixels, chart_prefix=f"{model_slug(spec)}-",
                                index_link=INDEX)
        text = builder.build()
        pages[spec] = model_page(spec)
        fs.write_text(fs.join(report_dir, pages[spec]), text)
        builders.append(builder)
        size += len(text.encode())
    return builders, pages, size


def unused_model_pages(report_dir: str, keep: set[str]) -> list[str]:
    """Local ``model-*.html`` pages of models no longer in the run; [] for remote report folders."""
    if fs.is_remote(report_dir) or not os.path.isdir(report_dir):
        return []
    return [os.path.join(report_dir, name) for name in sorted(os.listdir(report_dir))
            if name.startswith("model-") and name.endswith(".html") and name not in keep]
