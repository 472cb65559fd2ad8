"""Pure functions of Transformative Caption Analysis: caption pools, CLIP probabilities over a pool, the
before/after comparison of one transformed image, the paper's ordering of the cases and the per-transform
summary. No I/O and no model: everything here is numpy / pyarrow over arrays the stage hands in.

Captions are identified by a *key*, the text case-folded with its whitespace collapsed (:func:`caption_key`):
the CLIP tokenizer lower-cases and splits on whitespace, so texts with the same key have the same embedding,
and a pool holds each of them once.

Nothing here holds Python objects per caption, per image or per (caption, neighbour) pair at scale: keys are
Arrow string arrays, lookups ``pyarrow.compute.index_in``, neighbours an ``(Q, k)`` array and pools one CSR pair
(``offsets``, ``rows``); the cases are ordered with ``sort_indices`` and summarised with ``group_by``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit import knn
from clipaudit.records import TCAC_SUMMARY_SCHEMA

RECALL_AT = (1, 5, 10)
"""The k of the own-caption recall columns of the summary."""

KEY_CHUNK = 65_536
"""Captions keyed per step: bounds the transient Python strings of :func:`caption_keys`."""

POOL_CHUNK = 65_536
"""Images whose pools are built per step: bounds the transient candidate arrays of :func:`caption_pools`."""


def caption_key(text: str) -> str:
    """The deduplication key of a caption: case-folded, whitespace collapsed."""
    return " ".join(str(text).casefold().split())


def caption_keys(texts: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    """:func:`caption_key` of every text, as an Arrow string array (computed a chunk at a time)."""
    texts = _as_array(texts)
    parts = [pa.array([caption_key(t) for t in texts.slice(start, KEY_CHUNK).to_pylist()], pa.string())
             for start in range(0, len(texts), KEY_CHUNK)]
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _as_array(values: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    """A single Arrow string array from an array, a chunked array or a sequence of texts."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    return pa.array([str(v) for v in values], pa.string())


def first_rows(keys: pa.Array, value_set: pa.Array) -> np.ndarray:
    """For each key, the row of its first occurrence in ``value_set``, -1 where it is absent (int64)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    found = pc.index_in(keys, value_set=value_set)
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


class Texts(Sequence[str]):
    """A read-only sequence of ``str`` over an Arrow string array (``texts[i]`` is a ``str``, no copy)."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        """The text at ``i`` (a ``str``), or the list of texts of a slice."""
        if isinstance(i, slice):
            return self.array[i].to_pylist()
        return self.array[int(i)].as_py()

    def take(self, rows: np.ndarray) -> list[str]:
        """The texts of ``rows``, in order."""
        return self.array.take(pa.array(np.asarray(rows, dtype=np.int64), pa.int64())).to_pylist()


@dataclass(frozen=True)
class CaptionCorpus:
    """The unique captions of the corpus (one per key, in first-seen order) with their unit CLIP text vectors.

    ``texts`` is a :class:`Texts` view and ``keys`` an Arrow string array; rows are looked up in batches with
    :meth:`find` and :meth:`rows_of`. :meth:`lookup` and :meth:`rows` serve callers asking one text at a time
    (they build a dict of the keys on first use).
    """

    texts: Texts
    vectors: np.ndarray
    keys: pa.Array
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    def find(self, texts: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
        """Row of each text (by key), -1 where it is not in the corpus (int64)."""
        return first_rows(caption_keys(texts), self.keys)

    def rows_of(self, captions: pa.Array | pa.ChunkedArray) -> OwnRows:
        """Each list of ``captions`` (a list<string> column, one list per image) as corpus rows in order, each
        once, skipping texts not in the corpus: an :class:`OwnRows` CSR."""
        lists = _as_array(captions)
        if not isinstance(lists, pa.ListArray):
            lists = lists.cast(pa.list_(pa.string()))
        parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64)
        rows = self.find(pc.list_flatten(lists))
        known = rows >= 0
        return OwnRows.from_pairs(parents[known], rows[known], len(lists))

    def lookup(self, text: str) -> int | None:
        """Row of ``text`` (by key), or None when it is not in the corpus."""
        if not self._index and len(self.keys):
            self._index.update((key, i) for i, key in enumerate(self.keys.to_pylist()))
        return self._index.get(caption_key(text))

    def rows(self, texts: Sequence[str]) -> list[int]:
        """Rows of ``texts`` in order, each once, skipping texts not in the corpus."""
        found = (self.lookup(text) for text in texts)
        return list(dict.fromkeys(row for row in found if row is not None))


def corpus_of(texts: pa.Array | Sequence[str], vectors: np.ndarray, keys: pa.Array | None = None) -> CaptionCorpus:
    """A :class:`CaptionCorpus` of texts whose keys are already unique (``keys``: theirs, computed if None)."""
    texts = _as_array(texts)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    return CaptionCorpus(Texts(texts), vectors, caption_keys(texts) if keys is None else keys)


def build_corpus(texts: pa.Array | Sequence[str], vectors: np.ndarray) -> CaptionCorpus:
    """A :class:`CaptionCorpus` from parallel texts and vectors; the first text of each key is kept."""
    texts = _as_array(texts)
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
    keys = caption_keys(texts)
    unique = pc.unique(keys)
    keep = first_rows(unique, keys)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    kept = vectors[keep] if len(keep) else np.zeros((0, dim), np.float32)
    return corpus_of(texts.take(pa.array(keep, pa.int64())), kept, unique)


@dataclass(frozen=True)
class OwnRows:
    """Corpus rows per image as CSR: image ``i``'s rows are ``rows[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, i: int) -> np.ndarray:
        """The rows of image ``i``."""
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def sizes(self) -> np.ndarray:
        """Rows per image."""
        return np.diff(self.offsets)

    def take(self, images: np.ndarray) -> OwnRows:
        """The rows of ``images`` (positions), in that order."""
        images = np.asarray(images, dtype=np.int64)
        sizes = self.sizes()[images]
        parents = np.repeat(np.arange(len(images), dtype=np.int64), sizes)
        within = np.arange(len(parents), dtype=np.int64) - np.repeat(_offsets(sizes)[:-1], sizes)
        return OwnRows(_offsets(sizes), self.rows[np.repeat(self.offsets[images], sizes) + within])

    @staticmethod
    def from_pairs(parents: np.ndarray, rows: np.ndarray, n: int) -> OwnRows:
        """From (image, row) pairs sorted by image: each image's rows in order, repeats dropped (first kept)."""
        parents = np.asarray(parents, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        keep = _first_of_pairs(parents, rows)
        return OwnRows(_offsets(np.bincount(parents[keep], minlength=n)), rows[keep])

    @staticmethod
    def from_mapping(own: Mapping[str, Sequence[int]]) -> tuple[list[str], OwnRows]:
        """The image ids and their rows (repeats dropped) from a mapping image_id -> rows."""
        ids = list(own)
        sizes = np.asarray([len(own[i]) for i in ids], dtype=np.int64)
        flat = np.fromiter((int(r) for i in ids for r in own[i]), dtype=np.int64, count=int(sizes.sum()))
        return ids, OwnRows.from_pairs(np.repeat(np.arange(len(ids), dtype=np.int64), sizes), flat, len(ids))


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """CSR offsets (int64, one more than ``sizes``) from per-item sizes."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _first_of_pairs(parents: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions (ascending) of the first occurrence of each (parent, row) pair."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    span = int(rows.max()) + 1
    _, first = np.unique(parents * span + rows, return_index=True)
    return np.sort(first)


CrossTopk = Callable[[np.ndarray, np.ndarray, int, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]
"""``(queries, corpus, k, exclude) -> (ids, sims)`` with :func:`knn.cross_topk`'s result, e.g. a runner's
``topk(config.neighbours).cross_topk``, which runs large searches on Ray workers."""


def _in_process(queries: np.ndarray, corpus: np.ndarray, k: int,
                exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    return knn.cross_topk(queries, corpus, k, exclude=exclude)


@dataclass(frozen=True)
class CaptionNeighbours:
    """The ``k`` nearest other captions of each query row: ``ids[i]`` are those of corpus row ``queries[i]``."""

    queries: np.ndarray
    ids: np.ndarray

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The neighbour rows of corpus rows ``rows`` (each must be a query), ``(len(rows), k)``."""
        return self.ids[np.searchsorted(self.queries, np.asarray(rows, dtype=np.int64))]


def caption_neighbours(corpus: CaptionCorpus, rows: Sequence[int] | np.ndarray, k: int,
                       topk: CrossTopk | None = None) -> CaptionNeighbours:
    """The ``k`` nearest other captions of each distinct corpus row in ``rows`` by cosine (exact: ``topk``, by
    default :func:`knn.cross_topk` in this process), most similar first, ties by the smaller row. ``k`` is capped
    at ``len(corpus) - 1``."""
    queries = np.unique(np.asarray(rows, dtype=np.int64))
    k = max(min(k, len(corpus) - 1), 0)
    if len(queries) == 0 or k < 1:
        return CaptionNeighbours(queries, np.zeros((len(queries), 0), np.int64))
    ids, _ = (topk or _in_process)(corpus.vectors[queries], corpus.vectors, k, queries)
    return CaptionNeighbours(queries, np.asarray(ids, dtype=np.int64).reshape(len(queries), k))


@dataclass(eq=False)
class CaptionPools(Mapping[str, np.ndarray]):
    """Each image's caption pool as CSR: the pool of ``image_ids[i]`` is ``rows[offsets[i]:offsets[i + 1]]``
    (int64 corpus rows). A read-only mapping image_id -> pool; :meth:`pool` takes a position."""

    image_ids: pa.Array
    offsets: np.ndarray
    rows: np.ndarray
    _position: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def pool(self, i: int) -> np.ndarray:
        """The pool of the image at position ``i``."""
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def position(self, image_id: str) -> int | None:
        """Position of ``image_id``, None when it has no pool."""
        if not self._position and len(self.image_ids):
            self._position.update((image_id, i) for i, image_id in enumerate(self.image_ids.to_pylist()))
        return self._position.get(image_id)

    def sizes(self) -> np.ndarray:
        """Pool size per image."""
        return np.diff(self.offsets)

    def __getitem__(self, image_id: str) -> np.ndarray:
        i = self.position(image_id)
        if i is None:
            raise KeyError(image_id)
        return self.pool(i)

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids.to_pylist())

    def __len__(self) -> int:
        return len(self.image_ids)


def caption_pools(corpus: CaptionCorpus, own: OwnRows | Mapping[str, Sequence[int]], k: int,
                  topk: CrossTopk | None = None, image_ids: pa.Array | Sequence[str] | None = None) -> CaptionPools:
    """Each image's caption pool, as the paper builds it: its own captions, then for each of them its ``k``
    nearest captions in the corpus; deduplicated (first occurrence kept), as int64 corpus rows.

    ``own``: the corpus rows of each image's captions, an :class:`OwnRows` with ``image_ids`` naming its images
    in order, or a mapping image_id -> rows; ``topk`` runs the exact search (see :func:`caption_neighbours`).
    """
    if isinstance(own, OwnRows):
        ids = _as_array(image_ids if image_ids is not None else [str(i) for i in range(len(own))])
    else:
        names, own = OwnRows.from_mapping(own)
        ids = pa.array(names, pa.string())
    neighbours = caption_neighbours(corpus, own.rows, k, topk)
    parts = [_pool_rows(own, neighbours, start, min(start + POOL_CHUNK, len(own)))
             for start in range(0, len(own), POOL_CHUNK)]
    sizes = np.concatenate([s for s, _ in parts]) if parts else np.zeros(0, np.int64)
    rows = np.concatenate([r for _, r in parts]) if parts else np.zeros(0, np.int64)
    return CaptionPools(ids, _offsets(sizes), rows)


def _pool_rows(own: OwnRows, neighbours: CaptionNeighbours, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool sizes and rows of images ``start:stop``: own rows, then each own row's neighbours, repeats dropped."""
    offsets = own.offsets[start:stop + 1]
    mine = own.rows[offsets[0]:offsets[-1]]
    sizes = np.diff(offsets)
    parents = np.repeat(np.arange(stop - start, dtype=np.int64), sizes)
    near = neighbours.of(mine) if len(mine) else np.zeros((0, neighbours.ids.shape[1]), np.int64)
    candidates = np.concatenate([parents, np.repeat(parents, near.shape[1])])
    rows = np.concatenate([mine, near.reshape(-1)])
    order = np.argsort(candidates, kind="stable")
    candidates, rows = candidates[order], rows[order]
    keep = _first_of_pairs(candidates, rows)
    return np.bincount(candidates[keep], minlength=stop - start).astype(np.int64), rows[keep]


def pool_probabilities(image_vectors: np.ndarray, pool_vectors: np.ndarray, logit_scale: float,
                       logit_bias: float = float("nan")) -> np.ndarray:
    """The model's probabilities over a pool, float64 ``(n, m)``: ``softmax(logit_scale * cosine)`` per image row
    (CLIP), or, for a model with a learnt ``logit_bias`` (SigLIP), each caption's
    ``sigmoid(logit_scale * cosine + logit_bias)`` (they need not sum to 1, as in SigLIP's own scoring)."""
    images = np.atleast_2d(np.asarray(image_vectors, dtype=np.float64))
    logits = float(logit_scale) * (images @ np.asarray(pool_vectors, dtype=np.float64).T)
    if np.isfinite(logit_bias):
        return 1.0 / (1.0 + np.exp(-(logits + float(logit_bias))))
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


def mark_cases(cases: pa.Table, cases_per_transform: int, daf_ids: pa.Array | pa.ChunkedArray | Sequence[str],
               configured: Sequence[str]) -> pa.Table:
    """``cases`` sorted as the paper sorts them and marked.

    Per transform (in :func:`transform_order`): ``changed`` descending, then ``tv_distance`` descending, then
    ``image_id`` (ties keep the table's order). ``rank`` is the 1-based place in that order, ``is_case`` marks the
    first ``cases_per_transform``, ``daf_case`` marks the rows whose image is in ``daf_ids``. ``cases`` needs
    ``image_id``, ``transform``, ``changed`` and ``tv_distance``; its other columns are carried along (a narrow
    table keeps this cheap).
    """
    perm = case_order(cases, configured)
    out = cases.take(perm)
    ranks = _group_ranks(pc.index_in(out.column("transform"), value_set=pc.unique(out.column("transform"))))
    daf = pa.array(sorted(set(daf_ids)), pa.string()) if not isinstance(daf_ids, (pa.Array, pa.ChunkedArray)) \
        else daf_ids
    marks = {"rank": pa.array(ranks, pa.int32()),
             "is_case": pa.array(ranks <= cases_per_transform, pa.bool_()),
             "daf_case": pc.is_in(out.column("image_id"), value_set=daf)}
    for name, column in marks.items():
        where = out.schema.get_field_index(name)
        out = out.set_column(where, name, column) if where >= 0 else out.append_column(name, column)
    return out


def case_order(cases: pa.Table, configured: Sequence[str]) -> pa.Array:
    """Row positions of ``cases`` in the paper's order (see :func:`mark_cases`), a stable sort."""
    transforms = cases.column("transform")
    order = pa.array(transform_order(configured, pc.unique(transforms).to_pylist()), pa.string())
    keys = pa.table({"order": pc.index_in(transforms, value_set=order),
                     "changed": pc.fill_null(cases.column("changed"), 0),
                     "tv": pc.fill_null(cases.column("tv_distance"), 0.0),
                     "image_id": cases.column("image_id")})
    return pc.sort_indices(keys, sort_keys=[("order", "ascending"), ("changed", "descending"),
                                            ("tv", "descending"), ("image_id", "ascending")])


def _group_ranks(codes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """1-based place of each row within its run of equal ``codes`` (rows of a group are contiguous)."""
    values = np.asarray(pc.fill_null(codes, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.zeros(n, np.int64)
    boundary = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts[boundary] = boundary
    return np.arange(n, dtype=np.int64) - np.maximum.accumulate(starts) + 1


def summarize(cases: pa.Table, configured: Sequence[str]) -> pa.Table:
    """``tcac_summary``: per transform, the mean changed count, the share of images whose top-1 caption changed,
    own-caption recall@1/5/10 before and after (share of images whose chosen caption ranks within k), the mean
    total variation distance, the number of cases and of cases that are also DAF cases.

    ``cases`` is :func:`mark_cases`'s output (its order fixes each transform's ``model`` and the order of the
    sums); the per-transform sums are Arrow ``group_by`` aggregates, in row order."""
    totals = _summary_sums(cases)
    by_transform = {t: i for i, t in enumerate(totals.column("transform").to_pylist())}
    sums = {name: totals.column(name).to_pylist() for name in totals.column_names}
    rows = []
    for transform in transform_order(configured, list(by_transform)):
        i = by_transform[transform]
        n = sums["images"][i]
        row = {"transform": transform, "model": sums["model"][i], "images": n,
               "mean_changed": float(sums["changed"][i]) / n, "top1_changed_share": float(sums["top1"][i]) / n,
               "mean_tv_distance": float(sums["tv"][i]) / n, "cases": sums["cases"][i],
               "daf_cases": sums["daf_cases"][i]}
        for k in RECALL_AT:
            for when in ("before", "after"):
                row[f"recall_at_{k}_{when}"] = sums[f"recall_{k}_{when}"][i] / n
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=TCAC_SUMMARY_SCHEMA)


def _summary_sums(cases: pa.Table) -> pa.Table:
    """Per transform: rows, first model, and the sums behind :func:`summarize`'s means, shares and counts."""
    is_case = pc.fill_null(cases.column("is_case"), False)
    columns = {"transform": cases.column("transform"), "model": cases.column("model"),
               "changed": pc.cast(pc.fill_null(cases.column("changed"), 0), pa.int64()),
               "top1": pc.cast(pc.fill_null(cases.column("top1_changed"), False), pa.int64()),
               "tv": pc.cast(pc.fill_null(cases.column("tv_distance"), 0.0), pa.float64()),
               "cases": pc.cast(is_case, pa.int64()),
               "daf_cases": pc.cast(pc.and_(is_case, pc.fill_null(cases.column("daf_case"), False)), pa.int64())}
    for k in RECALL_AT:
        for when in ("before", "after"):
            within = pc.fill_null(pc.less_equal(cases.column(f"gt_rank_{when}"), k), False)
            columns[f"recall_{k}_{when}"] = pc.cast(within, pa.int64())
    sums = [(name, "sum") for name in columns if name not in ("transform", "model")]
    grouped = pa.table(columns).group_by("transform", use_threads=False).aggregate(
        [("model", "first"), ("transform", "count"), *sums])
    renamed = {f"{name}_sum": name for name, _ in sums} | {"model_first": "model", "transform_count": "images"}
    return grouped.rename_columns([renamed.get(name, name) for name in grouped.column_names])
