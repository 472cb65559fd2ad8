"""A slot's rows of the ``neighbours`` table: built from its top-k lists, and whether the stored ones are current (the
same images with the same k, method and model spec: a re-run then reuses them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.records import CLIP_MODEL, NEIGHBOURS, NEIGHBOURS_STORED_SCHEMA, REFERENCE_MODEL
from clipaudit.stages.neighbours.slots import Slot

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables


def lists_table(image_ids: pa.Array, slot: Slot, ids: np.ndarray, sims: np.ndarray, method: str,
                spec: str) -> pa.Table:
    """Rows of the ``neighbours`` table for one slot (row i of ``ids`` indexes ``image_ids``)."""
    n, k = ids.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.table({
        "image_id": image_ids,
        "model": pa.array([slot.role] * n, pa.string()),
        "ids": pa.ListArray.from_arrays(offsets, image_ids.take(pa.array(ids.reshape(-1)))),
        "sims": pa.ListArray.from_arrays(offsets, pa.array(sims.reshape(-1).astype(np.float32))),
        "k": pa.array(np.full(n, k, dtype=np.int32)),
        "method": pa.array([method] * n, pa.string()),
        "spec": pa.array([spec] * n, pa.string()),
        CLIP_MODEL: pa.array([slot.clip_model] * n, pa.string()),
        REFERENCE_MODEL: pa.array([slot.reference_model] * n, pa.string()),
    }, schema=NEIGHBOURS_STORED_SCHEMA)


def is_up_to_date(tables: RunTables, slot: Slot, image_ids: pa.Array, k: int, method: str, spec: str) -> bool:
    """Whether ``neighbours`` already holds, for ``slot``, exactly ``image_ids`` with this k, method and spec."""
    if not tables.exists(NEIGHBOURS) or not set(NEIGHBOURS_STORED_SCHEMA.names) <= set(
            tables.db.open_table(NEIGHBOURS).schema.names):
        return False
    rows = tables.read(NEIGHBOURS, ["image_id", "k", "method", "spec"], where=slot.where())
    return (rows.num_rows == len(image_ids)
            and pc.all(pc.equal(rows.column("k"), k)).as_py()
            and pc.all(pc.equal(rows.column("method"), method)).as_py()
            and pc.all(pc.equal(rows.column("spec"), spec)).as_py()
            and rows.column("image_id").take(pc.sort_indices(rows.column("image_id"))).equals(
                pa.chunked_array([image_ids])))
