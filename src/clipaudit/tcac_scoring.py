"""Pure functions of Transformative Caption Analysis: caption pools, CLIP probabilities over a pool, the
before/after comparison of one transformed image, the paper's ordering of the cases and the per-transform
summary. No I/O and no model: everything here is numpy / pyarrow over arrays the stage hands in.

Captions are identified by a *key*, the text case-folded with its whitespace collapsed (:func:`caption_key`):
the CLIP tokenizer lower-cases and splits on whitespace, so texts with the same key have the same embedding,
and a pool holds each of them once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipaudit import knn
from clipaudit.records import TCAC_SUMMARY_SCHEMA

RECALL_AT = (1, 5, 10)
"""The k of the own-caption recall columns of the summary."""


def caption_key(text: str) -> str:
    """The deduplication key of a caption: case-folded, whitespace collapsed."""
    return " ".join(str(text).casefold().split())


@dataclass(frozen=True)
class CaptionCorpus:
    """The unique captions of the corpus (one per key, in first-seen order) with their unit CLIP text vectors."""

    texts: list[str]
    vectors: np.ndarray
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.texts)

    def lookup(self, text: str) -> int | None:
        """Row of ``text`` (by key), or None when it is not in the corpus."""
        return self.index.get(caption_key(text))

    def rows(self, texts: Sequence[str]) -> list[int]:
        """Rows of ``texts`` in order, each once, skipping texts not in the corpus."""
        out: list[int] = []
        for text in texts:
            row = self.lookup(text)
            if row is not None and row not in out:
                out.append(row)
        return out


def build_corpus(texts: Sequence[str], vectors: np.ndarray) -> CaptionCorpus:
    """A :class:`CaptionCorpus` from parallel texts and vectors; the first text of each key is kept."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    index: dict[str, int] = {}
    keep: list[int] = []
    for i, text in enumerate(texts):
        key = caption_key(text)
        if key not in index:
            index[key] = len(keep)
            keep.append(i)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    kept = vectors[keep] if keep else np.zeros((0, dim), np.float32)
    return CaptionCorpus([str(texts[i]) for i in keep], np.ascontiguousarray(kept), index)


CrossTopk = Callable[[np.ndarray, np.ndarray, int, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]
"""``(queries, corpus, k, exclude) -> (ids, sims)`` with :func:`knn.cross_topk`'s result, e.g. a runner's
``topk(config.neighbours).cross_topk``, which runs large searches on Ray workers."""


def _in_process(queries: np.ndarray, corpus: np.ndarray, k: int,
                exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    return knn.cross_topk(queries, corpus, k, exclude=exclude)


def caption_neighbours(corpus: CaptionCorpus, rows: Sequence[int], k: int,
                       topk: CrossTopk | None = None) -> dict[int, list[int]]:
    """The ``k`` nearest other captions of each corpus row in ``rows`` by cosine (exact: ``topk``, by default
    :func:`knn.cross_topk` in this process), most similar first, ties by the smaller row. ``k`` is capped at
    ``len(corpus) - 1``."""
    queries = np.asarray(sorted(set(rows)), dtype=np.int64)
    k = min(k, len(corpus) - 1)
    if len(queries) == 0 or k < 1:
        return {int(q): [] for q in queries}
    ids, _ = (topk or _in_process)(corpus.vectors[queries], corpus.vectors, k, queries)
    return {int(q): [int(i) for i in row] for q, row in zip(queries, ids)}


def caption_pools(corpus: CaptionCorpus, own: Mapping[str, Sequence[int]], k: int,
                  topk: CrossTopk | None = None) -> dict[str, np.ndarray]:
    """Each image's caption pool, as the paper builds it: its own captions, then for each of them its ``k``
    nearest captions in the corpus; deduplicated (first occurrence kept), as int64 corpus rows.

    ``own`` maps an image_id to the corpus rows of its captions; ``topk`` runs the exact search (see
    :func:`caption_neighbours`).
    """
    neighbours = caption_neighbours(corpus, [row for rows in own.values() for row in rows], k, topk)
    pools: dict[str, np.ndarray] = {}
    for image_id, rows in own.items():
        pool = list(dict.fromkeys(int(r) for r in rows))
        seen = set(pool)
        for row in rows:
            for n in neighbours[int(row)]:
                if n not in seen:
                    seen.add(n)
                    pool.append(n)
        pools[image_id] = np.asarray(pool, dtype=np.int64)
    return pools


def pool_probabilities(image_vectors: np.ndarray, pool_vectors: np.ndarray, logit_scale: float) -> np.ndarray:
    """CLIP's probabilities over a pool: ``softmax(logit_scale * cosine)`` per image row, float64 ``(n, m)``."""
    images = np.atleast_2d(np.asarray(image_vectors, dtype=np.float64))
    logits = float(logit_scale) * (images @ np.asarray(pool_vectors, dtype=np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def ranking(probs: np.ndarray) -> np.ndarray:
    """Pool positions by probability descending, ties by the earlier position (a total, stable order)."""
    probs = np.asarray(probs)
    return np.lexsort((np.arange(len(probs)), -probs))


@dataclass(frozen=True)
class Comparison:
    """One image under one transform: its top captions before and after (pool positions) and what moved."""

    top_before: list[int]
    probs_before: list[float]
    top_after: list[int]
    probs_after: list[float]
    changed: int
    top1_changed: bool
    gt_rank_before: int | None
    gt_rank_after: int | None
    gt_prob_before: float | None
    gt_prob_after: float | None
    tv_distance: float


def compare(before: np.ndarray, after: np.ndarray, k: int, gt: int | None) -> Comparison:
    """Compare two probability vectors over one pool.

    ``changed`` is how many of the top ``k`` after are not in the top ``k`` before (the paper's difference in
    caption count), ``gt_rank_*`` the 1-based rank of pool position ``gt`` (None when ``gt`` is None), and
    ``tv_distance`` the total variation distance ``0.5 * sum |before - after|``.
    """
    order_before, order_after = ranking(before), ranking(after)
    top_before, top_after = order_before[:k].tolist(), order_after[:k].tolist()
    changed = len(set(top_after) - set(top_before))
    rank_before = rank_after = None
    prob_before = prob_after = None
    if gt is not None:
        rank_before = int(np.flatnonzero(order_before == gt)[0]) + 1
        rank_after = int(np.flatnonzero(order_after == gt)[0]) + 1
        prob_before, prob_after = float(before[gt]), float(after[gt])
    return Comparison(
        top_before=top_before, probs_before=[float(before[i]) for i in top_before],
        top_after=top_after, probs_after=[float(after[i]) for i in top_after],
        changed=changed, top1_changed=bool(top_before[:1] != top_after[:1]),
        gt_rank_before=rank_before, gt_rank_after=rank_after, gt_prob_before=prob_before, gt_prob_after=prob_after,
        tv_distance=float(0.5 * np.abs(np.asarray(before) - np.asarray(after)).sum()),
    )


def transform_order(configured: Sequence[str], present: Sequence[str]) -> list[str]:
    """Transforms in the configured order, then any others present (from earlier runs) alphabetically."""
    extra = sorted(set(present) - set(configured))
    return [t for t in configured if t in set(present)] + extra


def mark_cases(cases: pa.Table, cases_per_transform: int, daf_ids: set[str],
               configured: Sequence[str]) -> pa.Table:
    """``cases`` sorted as the paper sorts them and marked.

    Per transform (in :func:`transform_order`): ``changed`` descending, then ``tv_distance`` descending, then
    ``image_id``. ``rank`` is the 1-based place in that order, ``is_case`` marks the first
    ``cases_per_transform``, ``daf_case`` marks the rows whose image is in ``daf_ids``.
    """
    transforms = cases.column("transform").to_pylist()
    order = {t: i for i, t in enumerate(transform_order(configured, transforms))}
    changed = cases.column("changed").to_pylist()
    tv = cases.column("tv_distance").to_pylist()
    image_ids = cases.column("image_id").to_pylist()
    perm = sorted(range(cases.num_rows),
                  key=lambda i: (order[transforms[i]], -(changed[i] or 0), -(tv[i] or 0.0), image_ids[i]))
    ranks: list[int] = []
    previous, place = None, 0
    for i in perm:
        place = place + 1 if transforms[i] == previous else 1
        previous = transforms[i]
        ranks.append(place)
    out = cases.take(pa.array(perm, pa.int64()))
    replace = {
        "rank": pa.array(ranks, pa.int32()),
        "is_case": pa.array([r <= cases_per_transform for r in ranks], pa.bool_()),
        "daf_case": pa.array([image_ids[i] in daf_ids for i in perm], pa.bool_()),
    }
    for name, column in replace.items():
        out = out.set_column(out.schema.get_field_index(name), name, column)
    return out


def summarize(cases: pa.Table, configured: Sequence[str]) -> pa.Table:
    """``tcac_summary``: per transform, the mean changed count, the share of images whose top-1 caption changed,
    own-caption recall@1/5/10 before and after (share of images whose chosen caption ranks within k), the mean
    total variation distance, the number of cases and of cases that are also DAF cases."""
    columns = {name: cases.column(name).to_pylist() for name in (
        "transform", "model", "changed", "top1_changed", "gt_rank_before", "gt_rank_after", "tv_distance",
        "is_case", "daf_case")}
    rows = []
    for transform in transform_order(configured, columns["transform"]):
        idx = [i for i, t in enumerate(columns["transform"]) if t == transform]
        n = len(idx)

        def mean(values: list[float], idx: list[int] = idx, n: int = n) -> float:
            return float(sum(values[i] or 0 for i in idx)) / n

        def recall(column: str, k: int, idx: list[int] = idx, n: int = n) -> float:
            ranks = columns[column]
            return sum(1 for i in idx if ranks[i] is not None and ranks[i] <= k) / n

        row = {"transform": transform, "model": columns["model"][idx[0]], "images": n,
               "mean_changed": mean(columns["changed"]), "top1_changed_share": mean(columns["top1_changed"]),
               "mean_tv_distance": mean(columns["tv_distance"]),
               "cases": sum(1 for i in idx if columns["is_case"][i]),
               "daf_cases": sum(1 for i in idx if columns["is_case"][i] and columns["daf_case"][i])}
        for k in RECALL_AT:
            row[f"recall_at_{k}_before"] = recall("gt_rank_before", k)
            row[f"recall_at_{k}_after"] = recall("gt_rank_after", k)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=TCAC_SUMMARY_SCHEMA)
