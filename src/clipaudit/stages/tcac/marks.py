"""Sorting and marking ``tcac_cases`` (rank, is_case, daf_case) and recomputing ``tcac_summary``, each table rewritten
only when its content changed; the marks are computed on narrow columns and the rewrite streams the cases in
sorted order."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.records import (
    DAF_CASES,
    TCAC_CASES,
    TCAC_CASES_SCHEMA,
    TCAC_SUMMARY,
    TCAC_SUMMARY_SCHEMA,
    StageStats,
)
from clipaudit.tcac_scoring import mark_cases, summarize

if TYPE_CHECKING:
    from clipaudit.config import TcacConfig
    from clipaudit.io.tables import RunTables


CASE_COLUMNS = ("image_id", "transform", "model", "changed", "tv_distance", "top1_changed", "gt_rank_before",
                "gt_rank_after", "rank", "is_case", "daf_case")
"""The columns of ``tcac_cases`` that :func:`finalize` reads (about 60 bytes a row instead of about 2 KB)."""

MARKS = ("rank", "is_case", "daf_case")
"""The columns :func:`finalize` sets."""

REWRITE_ROWS = 16_384
"""Rows of ``tcac_cases`` the rewrite of :func:`finalize` holds at a time."""


def finalize(tables: RunTables, tcac: TcacConfig, stats: StageStats) -> pa.Table | None:
    """Sort and mark ``tcac_cases`` (rank, is_case, daf_case) and recompute ``tcac_summary``; each table is
    rewritten only when its content changed. Returns the summary (None when there are no cases).

    Only the narrow :data:`CASE_COLUMNS` are read; the rewrite streams the table in sorted order,
    :data:`REWRITE_ROWS` rows at a time."""
    start = time.perf_counter()
    cases = tables.read(TCAC_CASES, CASE_COLUMNS)
    if cases is None:
        return None
    cases = cases.cast(pa.schema([TCAC_CASES_SCHEMA.field(name) for name in CASE_COLUMNS]))
    daf = tables.read(DAF_CASES, ["image_id"]) if tables.exists(DAF_CASES) else None
    daf_ids = daf.column("image_id").combine_chunks() if daf is not None else pa.array([], pa.string())
    positions = pa.array(np.arange(cases.num_rows, dtype=np.int64))
    marked = mark_cases(cases.append_column("position", positions), tcac.cases_per_transform, daf_ids,
                        tcac.transforms)
    if not (marked.column("position").equals(pa.chunked_array([positions]))
            and marked.select(MARKS).equals(cases.select(MARKS))):
        rewrite_cases(tables, marked)
        stats.add_count("cases_rewritten", marked.num_rows)
    summary = summarize(marked, tcac.transforms)
    old = tables.read(TCAC_SUMMARY)
    if old is None or not old.select(TCAC_SUMMARY_SCHEMA.names).cast(TCAC_SUMMARY_SCHEMA).equals(summary):
        tables.replace(TCAC_SUMMARY, summary, TCAC_SUMMARY_SCHEMA)
    both = pc.and_(marked.column("is_case"), marked.column("daf_case"))
    stats.counts.update(total_pairs=marked.num_rows, total_cases=int(pc.sum(marked.column("is_case")).as_py() or 0),
                        total_daf_cases=pc.count_distinct(pc.filter(marked.column("image_id"), both)).as_py())
    stats.add_time("finalize", time.perf_counter() - start)
    return summary


def rewrite_cases(tables: RunTables, marked: pa.Table) -> None:
    """Rewrite (this model's rows of) ``tcac_cases`` in ``marked``'s order (its ``position`` column: positions among
    the rows :meth:`~clipaudit.io.tables.RunTables.read` returns) with ``marked``'s marks, streamed from the current
    version in batches of :data:`REWRITE_ROWS`."""
    dataset = tables.db.open_table(TCAC_CASES).to_lance()
    positions = tables.positions(TCAC_CASES)
    reader = pa.RecordBatchReader.from_batches(TCAC_CASES_SCHEMA, _marked_batches(dataset, marked, positions))
    tables.rewrite(TCAC_CASES, reader)


def _marked_batches(dataset: Any, marked: pa.Table, positions: np.ndarray | None) -> Iterator[pa.RecordBatch]:
    """The rows of ``dataset`` at ``marked``'s positions (mapped through ``positions``, the dataset positions of
    the rows read, when not None), in that order, with ``marked``'s marks set."""
    names = TCAC_CASES_SCHEMA.names
    for start in range(0, marked.num_rows, REWRITE_ROWS):
        part = marked.slice(start, REWRITE_ROWS)
        at = part.column("position").to_numpy()
        rows = dataset.take((at if positions is None else positions[at]).tolist(), columns=names)
        for name in MARKS:
            rows = rows.set_column(rows.schema.get_field_index(name), name, part.column(name))
        yield from rows.select(names).cast(TCAC_CASES_SCHEMA).to_batches()
