"""The caption pool each TCAC probe was ranked in, rebuilt from the run's stored caption vectors.

``tcac_cases`` records each row's top captions and its pool size, not the pool; the pool is a function of the
corpus captions, their CLIP text vectors (``caption_embeddings``) and ``pool_neighbours`` (the row's ``settings``),
so it is rebuilt here with the tcac stage's own functions (:func:`clipaudit.tcac_scoring.caption_pools`) and
checked against what the row recorded: a pool of another size, or one missing a recorded top caption, is not
exported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from clipaudit.benchmark.collect import caption_corpus_vectors
from clipaudit.run_view import RunView
from clipaudit.tcac_scoring import build_corpus, caption_pools

log = logging.getLogger("clipaudit.benchmark")
DEFAULT_POOL_NEIGHBOURS = 10


def _pool_neighbours(settings: str | None) -> int:
    try:
        return int(json.loads(settings or "{}").get("pool_neighbours", DEFAULT_POOL_NEIGHBOURS))
    except (ValueError, TypeError, AttributeError):
        return DEFAULT_POOL_NEIGHBOURS


def attach_pools(view: RunView, probes: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """``probes`` (``tcac_cases`` rows) with ``pool`` (caption texts in pool order) added; returns the rows whose
    pool could be rebuilt as recorded, and how many could not."""
    if not probes:
        return [], 0
    texts, vectors = caption_corpus_vectors(view)
    corpus = build_corpus(texts, vectors)
    samples = view.samples({p["image_id"] for p in probes}, ("image_id", "captions"))
    own = {image_id: corpus.rows(row.get("captions") or []) for image_id, row in samples.items()}
    by_k: dict[int, dict[str, list[int]]] = {}
    for probe in probes:
        k = _pool_neighbours(probe.get("settings"))
        by_k.setdefault(k, {})[probe["image_id"]] = own.get(probe["image_id"], [])
    pools = {k: caption_pools(corpus, wanted, k) for k, wanted in by_k.items()}
    kept, mismatched = [], 0
    for probe in probes:
        rows = pools[_pool_neighbours(probe.get("settings"))].get(probe["image_id"])
        pool = [corpus.texts[int(r)] for r in rows] if rows is not None else []
        if (len(pool) != probe.get("pool_size") or not set(probe.get("top_before") or []) <= set(pool)
                or probe["gt_caption"] not in pool):
            mismatched += 1
            continue
        kept.append({**probe, "pool": pool})
    if mismatched:
        log.warning("%d TCAC probes left out: their caption pool could not be rebuilt as recorded (caption "
                    "vectors missing or changed since the tcac stage)", mismatched)
    return kept, mismatched
