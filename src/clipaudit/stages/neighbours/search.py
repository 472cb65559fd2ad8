"""Where and how one slot's lists are searched: the device (``neighbours.device``), then the exact search through the
runner's top-k search or the ``ann`` method (with its recall), timed and noted into the stage's stats."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.records import StageStats
from clipaudit.stages.neighbours.ann import ann_neighbours, recall_at_k
from clipaudit.stages.neighbours.slots import NeighboursError, Slot

if TYPE_CHECKING:
    from clipaudit.config import NeighboursConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import TopkSearch

log = logging.getLogger("clipaudit.neighbours")


def resolve_device(setting: str) -> str:
    """``cpu`` or ``cuda`` for the search; ``auto`` is CUDA when torch sees a GPU."""
    if setting == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if setting == "cuda" and not available:
        raise NeighboursError("neighbours.device is cuda but torch sees no GPU")
    return "cuda" if available else "cpu"


def search_slot(tables: RunTables, slot: Slot, vectors: np.ndarray, cfg: NeighboursConfig, device: str,
                stats: StageStats, search: TopkSearch) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, sims)``: the top-``cfg.k`` rows of ``vectors`` for each of its rows, by ``cfg.method`` (exact: through
    ``search``); the time, the ann recall and where the exact search ran go into ``stats``."""
    started = time.perf_counter()
    if cfg.method == "ann":
        ids, sims = ann_neighbours(tables, slot.role, vectors, cfg, device)
        stats.add_time(f"search_{slot.name}", time.perf_counter() - started)
        if cfg.recall_sample:
            started = time.perf_counter()
            recall = recall_at_k(vectors, ids, cfg.recall_sample, cfg.seed, device)
            stats.notes.setdefault("recall_at_k", {})[slot.name] = recall
            stats.add_time("recall", time.perf_counter() - started)
            log.info("ann %s: recall@%d = %.4f on %d sampled images", slot.name, cfg.k, recall,
                     min(cfg.recall_sample, len(vectors)))
        return ids, sims
    ids, sims = search.self_topk(vectors, cfg.k)
    stats.notes.setdefault("search", {})[slot.name] = dict(search.notes)
    stats.add_time(f"search_{slot.name}", time.perf_counter() - started)
    return ids, sims
