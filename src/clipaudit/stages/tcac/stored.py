"""Vectors that earlier stages stored, read back so that nothing is computed twice: caption vectors from
``caption_embeddings`` (streamed batch by batch into one array) and the original images' CLIP vectors from
``image_embeddings_clip``, each only where it is of the stage's CLIP model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.records import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS
from clipaudit.stages.tcac.plan import TcacError
from clipaudit.tcac_scoring import caption_keys, first_rows

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A vector column (fixed- or variable-size lists of one length) as a float32 ``(n, d)`` array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(array), len(values) // max(len(array), 1))


def stored_vectors(tables: RunTables, keys: pa.Array, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """For each key, its first row in ``caption_embeddings`` (-1 where none), and the float32 vectors of the found
    keys in key order; TcacError when the stored vectors are another model's. The vectors are streamed batch by
    batch into one array: the driver holds them once, plus a batch."""
    stored = tables.read(CAPTION_EMBEDDINGS, ["text", "model"])
    if stored is None or stored.num_rows == 0:
        return np.full(len(keys), -1, np.int64), np.zeros((0, 0), np.float32)
    models = set(pc.unique(stored.column("model")).to_pylist())
    if models != {spec}:
        raise TcacError(f"{CAPTION_EMBEDDINGS} in {tables.uri} holds vectors of {sorted(models)}, but the CLIP "
                        f"model is {spec!r}: use a new run_dir for a different model")
    at = first_rows(keys, caption_keys(stored.column("text")))
    dataset = tables.db.open_table(CAPTION_EMBEDDINGS).to_lance()
    batches = dataset.to_batches(columns=["vector"], filter=tables.scope_filter(CAPTION_EMBEDDINGS))
    return at, _gather_vectors(batches, at[at >= 0])


def _gather_vectors(batches: Iterator[pa.RecordBatch], rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (positions among the streamed rows) of the ``vector`` column streamed in ``batches``, in
    ``rows``' order, as one writable float32 ``(len(rows), d)`` array (``d`` from the first vector; ``(0, 0)``
    when ``rows`` is empty)."""
    out = np.zeros((0, 0), np.float32)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    offset = 0
    for batch in batches:
        lo, hi = np.searchsorted(wanted, [offset, offset + batch.num_rows])
        if hi > lo:
            vectors = _vectors(batch.column("vector"))[wanted[lo:hi] - offset]
            if not out.size:
                out = np.empty((len(rows), vectors.shape[1]), np.float32)
            out[order[lo:hi]] = vectors
        offset += batch.num_rows
    return out


def load_originals(tables: RunTables, spec: str, image_ids: set[str]) -> dict[str, np.ndarray]:
    """Stored CLIP vectors of ``image_ids`` from ``image_embeddings_clip``, where they are of model ``spec``."""
    stored = tables.read(IMAGE_EMBEDDINGS["clip"], ["image_id", "model", "vector"])
    if stored is None or stored.num_rows == 0:
        return {}
    mask = pc.and_(pc.equal(stored.column("model"), spec),
                   pc.is_in(stored.column("image_id"), value_set=pa.array(sorted(image_ids), pa.string())))
    stored = stored.filter(mask)
    if stored.num_rows == 0:
        return {}
    return dict(zip(stored.column("image_id").to_pylist(), _vectors(stored.column("vector"))))
