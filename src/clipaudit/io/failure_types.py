"""Reading and writing ``failure_types``, the table two namers share (``namer``: ``caption_contrast``, ``llm``).

Each namer replaces only its own rows (of its CLIP model, through a model view). A table written before there
were two namers has no ``namer`` column: it is rewritten once, its rows marked as the LLM's (who wrote them).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from clipaudit.io.tables import sql_string
from clipaudit.records import CLIP_MODEL, FAILURE_TYPES, FAILURE_TYPES_SCHEMA, NAMERS, with_clip_model

LLM = "llm"


def _base(tables: Any) -> Any:
    return getattr(tables, "base", tables)


def upgrade(tables: Any) -> None:
    """Rewrite a ``failure_types`` table without the namer columns with them (its rows are the LLM's)."""
    base = _base(tables)
    if not base.exists(FAILURE_TYPES) or base.has_column(FAILURE_TYPES, "namer"):
        return
    old = base.read(FAILURE_TYPES)
    schema = with_clip_model(FAILURE_TYPES_SCHEMA) if CLIP_MODEL in old.column_names else FAILURE_TYPES_SCHEMA
    rows = [{**row, "namer": LLM} for row in old.to_pylist()]
    base.replace(FAILURE_TYPES, pa.Table.from_pylist(rows, schema=schema), schema)


def replace_rows(tables: Any, rows: pa.Table, namer: str) -> None:
    """Replace ``namer``'s rows of ``failure_types`` (this model's, when ``tables`` is a model view) with ``rows``
    (their ``namer`` column is set here)."""
    if namer not in NAMERS:
        raise ValueError(f"unknown namer {namer!r} (known: {', '.join(NAMERS)})")
    upgrade(tables)
    rows = rows.select([name for name in rows.column_names if name != "namer"])
    rows = rows.append_column("namer", pa.repeat(pa.scalar(namer, pa.string()), rows.num_rows))
    missing = [f for f in FAILURE_TYPES_SCHEMA if f.name not in rows.column_names]
    for f in missing:
        rows = rows.append_column(f.name, pa.nulls(rows.num_rows, f.type))
    tables.replace_where(FAILURE_TYPES, rows, FAILURE_TYPES_SCHEMA, f"namer = {sql_string(namer)}")


def read_rows(tables: Any, namer: str | None = None) -> list[dict[str, Any]] | None:
    """The rows of ``failure_types`` (of one namer, when given; rows without a namer are the LLM's); None when
    there is no table."""
    if not tables.exists(FAILURE_TYPES):
        return None
    rows = tables.read(FAILURE_TYPES).to_pylist()
    for row in rows:
        row["namer"] = row.get("namer") or LLM
    return rows if namer is None else [row for row in rows if row["namer"] == namer]
