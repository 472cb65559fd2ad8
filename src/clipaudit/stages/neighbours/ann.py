"""The ``ann`` method: approximate top-k through a LanceDB vector index (``neighbours.ann_index``, cosine) over a
scratch table per role, candidates re-scored with exact fp32 inner products (exact search for the rows that get
fewer than k), and its recall@k against exact search on a seeded sample."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from clipaudit import knn
from clipaudit.daf_metrics import overlap_counts
from clipaudit.records import NEIGHBOURS_ANN
from clipaudit.stages.neighbours.slots import NeighboursError

if TYPE_CHECKING:
    from clipaudit.config import NeighboursConfig
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.neighbours")
ANN_QUERY_BATCH = 1024
"""Query vectors per LanceDB search call."""


def _ann_index_config(cfg: NeighboursConfig, n: int):
    from lancedb import index

    kinds = {"IVF_FLAT": index.IvfFlat, "IVF_PQ": index.IvfPq, "IVF_HNSW_SQ": index.IvfHnswSq}
    partitions = min(n, cfg.ann_partitions or max(1, round(math.sqrt(n))))
    return kinds[cfg.ann_index](distance_type="cosine", num_partitions=partitions)


def _ann_candidates(table, queries: np.ndarray, limit: int, cfg: NeighboursConfig) -> np.ndarray:
    """``(q, limit)`` candidate rows per query from the index, -1 where fewer came back."""
    query = (table.search(queries, vector_column_name="vector").distance_type("cosine")
             .limit(limit).nprobes(cfg.ann_nprobes).select(["row", "_distance"]))
    if cfg.ann_refine_factor:
        query = query.refine_factor(cfg.ann_refine_factor)
    found = query.to_arrow()
    rows = found.column("row").to_numpy()
    which = (found.column("query_index").to_numpy() if "query_index" in found.column_names
             else np.zeros(len(rows), dtype=np.int64))
    order = np.lexsort((rows, which))
    rows, which = rows[order], which[order]
    starts = np.searchsorted(which, np.arange(len(queries)))
    position = np.arange(len(rows)) - starts[which]
    out = np.full((len(queries), limit), -1, dtype=np.int64)
    keep = position < limit
    out[which[keep], position[keep]] = rows[keep]
    return out


def _best_k(vectors: np.ndarray, owners: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The k best candidates per owner row by exact fp32 similarity (ties by smaller row), and how many were valid."""
    valid = (candidates >= 0) & (candidates != owners[:, None])
    sims = np.einsum("qd,qld->ql", vectors[owners], vectors[np.where(valid, candidates, 0)])
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    ids = np.where(valid, candidates, np.iinfo(np.int64).max)
    order = np.lexsort((ids, -sims), axis=-1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1), valid.sum(axis=1)


def ann_neighbours(tables: RunTables, role: str, vectors: np.ndarray, cfg: NeighboursConfig,
                   device: str) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k through a LanceDB vector index over a scratch table; exact search where it falls short."""
    n, dim = vectors.shape
    k = cfg.k
    rows = pa.table({"row": pa.array(np.arange(n), pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    table = tables.db.create_table(NEIGHBOURS_ANN[role], data=rows, mode="overwrite")
    try:
        table.create_index("vector", config=_ann_index_config(cfg, n))
    except Exception as exc:
        raise NeighboursError(f"neighbours.ann_index {cfg.ann_index}: LanceDB could not build the index over "
                              f"{n} vectors ({exc}); try IVF_FLAT or method: exact") from exc
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    short = []
    for lo in range(0, n, ANN_QUERY_BATCH):
        owners = np.arange(lo, min(lo + ANN_QUERY_BATCH, n))
        candidates = _ann_candidates(table, vectors[owners], k + 1, cfg)
        ids[owners], sims[owners], found = _best_k(vectors, owners, candidates, k)
        short.extend(owners[found < k].tolist())
    if short:
        log.info("ann: %d %s queries got fewer than k=%d candidates; searched exactly", len(short), role, k)
        rows_short = np.asarray(short, dtype=np.int64)
        ids[rows_short], sims[rows_short] = knn.cross_topk(vectors[rows_short], vectors, k, exclude=rows_short,
                                                           device=device)
    return ids, sims


def recall_at_k(vectors: np.ndarray, approx: np.ndarray, sample: int, seed: int, device: str) -> float:
    """Mean share of the exact top-k that ``approx`` found, over a seeded sample of rows."""
    n, k = approx.shape
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    exact, _ = knn.cross_topk(vectors[rows], vectors, k, exclude=rows, device=device)
    return float(overlap_counts(approx[rows], exact).mean() / k)
