"""Neighbours stage: the top-k cosine neighbours of every image under each model -> ``neighbours``.

The lists are computed per *slot*: each CLIP-role model of ``models.clip`` (rows with ``model = 'clip'`` and
``clip_model`` its spec) and each reference of ``models.reference`` (``model = 'reference'``, ``reference_model``
its spec, ``clip_model`` empty: reference lists are shared by every CLIP-role model). Only the images embedded by
*every* model (the intersection over the models' rows of ``image_embeddings_clip`` and
``image_embeddings_reference``) take part, as queries and as candidates, so that an image's lists are drawn from
the same pool and can be compared; the stats say how many images each slot had and how many were left out.
Rows are ordered by image_id, so ties (equal similarities) go to the smaller image_id, deterministically.

``neighbours.method``:

* ``exact`` (default): :func:`clipaudit.knn.self_topk`, a blocked matrix product with a running top-k; memory
  O(block x N + N x k) on top of the vectors, never N x N. On the CPU the products are exact fp32; on a GPU
  (``neighbours.device: auto`` and CUDA present) they are fp16 with fp32 accumulation for ``k + lowp_margin``
  candidates, re-scored in fp32 (:func:`clipaudit.knn.refine`), so the result is exact there too.
* ``ann``: a LanceDB vector index (``neighbours.ann_index``, cosine) over a scratch table per role; candidates
  are re-scored with exact fp32 inner products, and rows that get fewer than k candidates fall back to exact
  search. Its recall@k against exact search is measured on a seeded sample (``neighbours.recall_sample``) and
  written into the stats.

Where the exact search runs: from ``neighbours.ray_min_images`` images on, with ``ray.runner: ray``, on Ray
actors (the runner's :meth:`~clipaudit.runtime.RayRunner.topk`): the vectors go into the object store once,
the block products of the symmetric search are dealt to the actors (GPU actors when the cluster has GPUs), and
the driver merges one N x k partial result per actor; the ids are those of the in-process search. Smaller
corpora, and ``ray.runner: local``, search in this process (on its GPU when there is one). The search costs
about N^2 d / 2 multiply-adds per role; past :data:`CPU_EXACT_WARN` images on CPUs it is hours: the stage warns
there, and GPUs or ``method: ann`` are the way (on one GPU, fp16, N of a few million is minutes).

Re-running reuses a slot's lists when the table already holds, for that slot, exactly the current image set with
the same k, method and model spec; only the other slots are computed, and their rows replaced (one write per
slot): adding a CLIP-role model to the list computes only its lists.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit import knn
from clipaudit.daf_metrics import overlap_counts
from clipaudit.errors import ClipauditError
from clipaudit.io.tables import sql_string
from clipaudit.records import (
    CLIP_MODEL,
    IMAGE_EMBEDDINGS,
    NEIGHBOURS,
    NEIGHBOURS_ANN,
    NEIGHBOURS_STORED_SCHEMA,
    REFERENCE_MODEL,
    StageStats,
)

if TYPE_CHECKING:
    from clipaudit.config import Config, NeighboursConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import LazyRunner, LocalRunner, RayRunner, TopkSearch

log = logging.getLogger("clipaudit.neighbours")
STAGE = "neighbours"
CPU_EXACT_WARN = 250_000
"""Images above which exact search on a CPU takes hours: the stage warns and suggests a GPU or ``ann``."""
ANN_QUERY_BATCH = 1024
"""Query vectors per LanceDB search call."""


class NeighboursError(ClipauditError, RuntimeError):
    """The neighbours cannot be computed as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Slot:
    """One set of neighbour lists: a CLIP-role model (``clip_model`` its spec as written in the config) or a
    reference (``reference_model`` its spec). ``name`` (``clip``, ``clip_2``, ..., ``reference``, ``reference_2``,
    ...) names it in the stats."""

    name: str
    role: str
    clip_model: str = ""
    reference_model: str = ""

    @property
    def spec(self) -> str:
        """The model's spec as written in the config."""
        return self.clip_model if self.role == "clip" else self.reference_model

    def where(self) -> str:
        """The SQL predicate selecting this slot's rows of ``neighbours``."""
        return (f"model = {sql_string(self.role)} AND {CLIP_MODEL} = {sql_string(self.clip_model)} AND "
                f"{REFERENCE_MODEL} = {sql_string(self.reference_model)}")


def slots_of(config: Config) -> list[Slot]:
    """The slots of a run: every CLIP-role model in config order, then every reference."""
    clip = [Slot(name, "clip", clip_model=spec) for name, spec in config.models.clip_slots.items()]
    return [*clip, *(Slot(name, "reference", reference_model=spec)
                     for name, spec in config.models.reference_slots.items())]


@dataclass
class RoleIds:
    """One role's embedded image ids (string array, in table order) and its model spec."""

    role: str
    spec: str
    ids: pa.Array


@dataclass
class RoleVectors(RoleIds):
    """One role's image vectors: ``ids`` (string array) and their L2-normalised float32 rows, and the spec."""

    vectors: np.ndarray


def vector_matrix(column: pa.ChunkedArray | pa.Array, ids: pa.Array, table_name: str) -> np.ndarray:
    """A vector column as an ``(n, d)`` float32 array; NeighboursError naming the table on nulls or mixed sizes."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        first = ids[pc.index(pc.is_null(arr), True).as_py()].as_py()
        raise NeighboursError(f"{table_name}: {arr.null_count} image(s) have no vector (e.g. {first!r}): "
                              "re-run embed into a new run_dir")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr)
        dims = pc.value_counts(lengths).to_pylist()
        if len(dims) > 1:
            dims.sort(key=lambda item: -item["counts"])
            odd = ids[pc.index(pc.not_equal(lengths, dims[0]["values"]), True).as_py()].as_py()
            found = ", ".join(f"{d['values']} ({d['counts']} rows)" for d in dims)
            raise NeighboursError(f"{table_name} holds vectors of mismatched dimensions: {found}, e.g. image "
                                  f"{odd!r}; every vector of a model must have one dimension: re-run embed "
                                  "into a new run_dir")
        dim = dims[0]["values"] if dims else 0
    values = np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return (values if values.flags.writeable else values.copy()).reshape(len(arr), dim)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def normalise_in_place(vectors: np.ndarray) -> None:
    """Scale the rows of a float32 array to unit length in place (zero rows stay zero); same values as
    :func:`normalise`."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, np.where(norms > 0, norms, 1.0), out=vectors)


def _embedding_dataset(tables: RunTables, role: str):
    """The lance dataset of one role's embeddings; NeighboursError when it is missing or empty."""
    name = IMAGE_EMBEDDINGS[role]
    dataset = tables.db.open_table(name).to_lance() if tables.exists(name) else None
    if dataset is None or dataset.count_rows() == 0:
        raise NeighboursError(f"no embeddings for the {role} role (table {name} in {tables.uri} is missing or "
                              "empty): run embed first")
    return dataset


def _one_spec(specs: set[str], name: str) -> str:
    """The one model spec of a table; NeighboursError when it holds several."""
    if len(specs) != 1:
        raise NeighboursError(f"{name} holds vectors of several models {sorted(specs)}: use one run_dir per model")
    return next(iter(specs))


def _spec_column(role: str) -> str:
    return CLIP_MODEL if role == "clip" else REFERENCE_MODEL


def _scoped(dataset, role: str, spec: str | None) -> bool:
    """Whether one model's rows are picked out of the role's table by its spec column (False: the table is read
    whole: no spec asked for, or a table written without the column, by an older clipaudit, which holds one
    model)."""
    return bool(spec) and _spec_column(role) in dataset.schema.names


def _model_rows(dataset, role: str, spec: str | None) -> tuple[pa.Table, np.ndarray | None]:
    """The ``image_id`` and ``model`` columns of one model's rows, and their row positions in the dataset (None:
    every row). A role's table holds one model's rows per ``clip_model`` / ``reference_model``."""
    if not _scoped(dataset, role, spec):
        return dataset.to_table(columns=["image_id", "model"]), None
    column = _spec_column(role)
    keys = dataset.to_table(columns=["image_id", "model", column])
    positions = np.flatnonzero(pc.equal(keys.column(column), spec).to_numpy(zero_copy_only=False))
    if len(positions) == 0:
        raise NeighboursError(f"no embeddings of {role} model {spec!r} in {IMAGE_EMBEDDINGS[role]}: run embed first "
                              f"(with every model of models.{role})")
    return keys.take(pa.array(positions)).select(["image_id", "model"]), positions


def load_ids(tables: RunTables, role: str, spec: str | None = None) -> RoleIds:
    """One model's image ids and spec, without its vectors (errors as :func:`load_vectors`); ``spec`` picks the
    model of the role (None: the table's only one)."""
    name = IMAGE_EMBEDDINGS[role]
    table, _ = _model_rows(_embedding_dataset(tables, role), role, spec)
    spec = _one_spec(set(pc.unique(table.column("model")).to_pylist()), name)
    return RoleIds(role, spec, table.column("image_id").combine_chunks())


READ_CHUNK_BYTES = 8 << 20
"""Vector bytes read per ``take`` when loading a role: the loader holds its float32 matrix and a few times this
more (a larger read makes lance hold several times it; a scan holds a whole data page, up to the column)."""


@dataclass
class _LoadProblems:
    """What reading a role's vectors found wrong, raised once the whole table has been seen (nulls first)."""

    nulls: int = 0
    first_null: str | None = None
    first_non_finite: str | None = None

    def raise_any(self, name: str) -> None:
        """NeighboursError for the first kind of problem found, naming the first image that has it."""
        if self.nulls:
            raise NeighboursError(f"{name}: {self.nulls} image(s) have no vector (e.g. {self.first_null!r}): "
                                  "re-run embed into a new run_dir")
        if self.first_non_finite is not None:
            raise NeighboursError(f"{name}: non-finite values in the vector of {self.first_non_finite!r}")


def _check_finite(vectors: np.ndarray, ids: pa.Array, problems: _LoadProblems) -> None:
    """Note the first image of ``ids`` whose row of ``vectors`` has a NaN or an infinity."""
    finite = np.isfinite(vectors).all(axis=1)
    if problems.first_non_finite is None and not finite.all():
        problems.first_non_finite = ids[int(np.flatnonzero(~finite)[0])].as_py()


class _Ragged(Exception):
    """Vectors of one model with different lengths: read the table whole to name them (:func:`_read_whole`)."""


def _fill_chunk(out: np.ndarray, column: pa.Array, ids: pa.Array, problems: _LoadProblems) -> None:
    """Copy one chunk's vectors (of images ``ids``) into ``out``, its rows of the matrix, checked and normalised
    in place; :class:`_Ragged` when a variable-size vector has another length than ``out``'s rows."""
    if column.null_count:
        if problems.first_null is None:
            problems.first_null = ids[pc.index(pc.is_null(column), True).as_py()].as_py()
        problems.nulls += column.null_count
    if problems.nulls:
        return
    if not pa.types.is_fixed_size_list(column.type) and not pc.all(
            pc.equal(pc.list_value_length(column), out.shape[1])).as_py():
        raise _Ragged
    out[:] = column.flatten().to_numpy(zero_copy_only=False).reshape(out.shape)
    _check_finite(out, ids, problems)
    normalise_in_place(out)


def _read_chunked(dataset, name: str, dim: int | None, role: str,
                  spec: str | None) -> tuple[pa.Array, str, np.ndarray]:
    """Read one model's vectors chunk by chunk (``take`` of row ranges, whose buffers are freed after each chunk)
    into one preallocated float32 array, normalised in place: ``(ids, spec, vectors)``; NeighboursError on several
    specs, null or non-finite vectors. ``dim`` None (variable-size vectors): the first vector's length, and
    :class:`_Ragged` when another differs."""
    keys, positions = _model_rows(dataset, role, spec)
    resolved = _one_spec(set(pc.unique(keys.column("model")).to_pylist()), name)
    ids = keys.column("image_id").combine_chunks()
    if dim is None:
        first = dataset.take([0 if positions is None else int(positions[0])], columns=["vector"]).column("vector")
        dim = len(first[0].as_py() or [])
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    step = max(1, READ_CHUNK_BYTES // max(1, 4 * dim))
    problems = _LoadProblems()
    for lo in range(0, len(ids), step):
        hi = min(lo + step, len(ids))
        rows = np.arange(lo, hi) if positions is None else positions[lo:hi]
        column = dataset.take(rows, columns=["vector"]).column("vector").combine_chunks()
        _fill_chunk(vectors[lo:hi], column, ids[lo:hi], problems)
    problems.raise_any(name)
    return ids, resolved, vectors


def _read_whole(dataset, name: str, role: str, spec: str | None) -> tuple[pa.Array, str, np.ndarray]:
    """``(ids, spec, vectors)`` of one model in a table whose vectors are variable-size lists, read whole, to name
    mismatched dimensions; NeighboursError on several specs, null, mismatched or non-finite vectors."""
    where = f"{_spec_column(role)} = {sql_string(spec)}" if _scoped(dataset, role, spec) else None
    table = dataset.to_table(columns=["image_id", "model", "vector"], filter=where)
    if table.num_rows == 0:
        raise NeighboursError(f"no embeddings of {role} model {spec!r} in {name}: run embed first (with every "
                              f"model of models.{role})")
    ids = table.column("image_id").combine_chunks()
    resolved = _one_spec(set(pc.unique(table.column("model")).to_pylist()), name)
    vectors = vector_matrix(table.column("vector"), ids, name)
    problems = _LoadProblems()
    _check_finite(vectors, ids, problems)
    problems.raise_any(name)
    normalise_in_place(vectors)
    return ids, resolved, vectors


def load_vectors(tables: RunTables, role: str, spec: str | None = None) -> RoleVectors:
    """Read one model's embeddings, L2-normalised (``spec`` picks the model of the role, as written in the config;
    None: the table's only one); NeighboursError when there are none ("run embed first") or they are unusable.
    The vectors are read in chunks into one preallocated float32 matrix: the peak is that matrix and a few times
    :data:`READ_CHUNK_BYTES` more. Where one model's vectors differ in length (variable-size lists: a role's table
    holds several models), the table is read whole to name them."""
    name = IMAGE_EMBEDDINGS[role]
    dataset = _embedding_dataset(tables, role)
    kind = dataset.schema.field("vector").type
    try:
        ids, resolved, vectors = _read_chunked(dataset, name, kind.list_size if pa.types.is_fixed_size_list(kind)
                                               else None, role, spec)
    except _Ragged:
        ids, resolved, vectors = _read_whole(dataset, name, role, spec)
    return RoleVectors(role, resolved, ids, vectors)


def restrict(vectors: RoleVectors, image_ids: pa.Array) -> np.ndarray:
    """The role's rows in the order of ``image_ids`` (the role's own array, no copy, when that is its order);
    NeighboursError when it lacks some of them."""
    rows = pc.index_in(image_ids, value_set=vectors.ids)
    if rows.null_count:
        raise NeighboursError(f"{IMAGE_EMBEDDINGS[vectors.role]} lacks {rows.null_count} of the images asked for: "
                              "re-run the neighbours stage")
    index = rows.to_numpy(zero_copy_only=False)
    if len(index) == len(vectors.vectors) and np.array_equal(index, np.arange(len(index))):
        return vectors.vectors
    return vectors.vectors[index]


def common_ids(roles: Mapping[str, RoleIds]) -> pa.Array:
    """The image ids every role embedded, sorted (Arrow throughout: no Python object per id)."""
    common: pa.Array | None = None
    for role in roles.values():
        ids = role.ids.drop_null()
        common = ids if common is None else common.filter(pc.is_in(common, value_set=ids))
    if common is None:
        return pa.array([], pa.string())
    common = pc.unique(common).cast(pa.string())
    return common.take(pc.sort_indices(common))


def resolve_device(setting: str) -> str:
    """``cpu`` or ``cuda`` for the search; ``auto`` is CUDA when torch sees a GPU."""
    if setting == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if setting == "cuda" and not available:
        raise NeighboursError("neighbours.device is cuda but torch sees no GPU")
    return "cuda" if available else "cpu"


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


def _search(tables: RunTables, slot: Slot, vectors: np.ndarray, cfg: NeighboursConfig, device: str,
            stats: StageStats, search: TopkSearch) -> tuple[np.ndarray, np.ndarray]:
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


def check_size(n: int, k: int) -> None:
    """NeighboursError unless there are images and ``k`` is smaller than their number ``n``."""
    if n == 0:
        raise NeighboursError("no image is embedded by every model (the clip models and the reference): run embed "
                              "first (with every model) on the same samples")
    if k >= n:
        raise NeighboursError(f"neighbours.k={k} must be smaller than N={n}, the number of images embedded "
                              "by every model (each image's own vector is excluded)")


def _slot_lists(tables: RunTables, slot: Slot, image_ids: pa.Array, cfg: NeighboursConfig, device: str,
                stats: StageStats, search: TopkSearch) -> pa.Table:
    """Load one slot's vectors, search them over ``image_ids`` and return its rows of the table; the vectors are
    released when it returns."""
    started = time.perf_counter()
    vectors = load_vectors(tables, slot.role, slot.spec)
    rows = restrict(vectors, image_ids)
    stats.add_time("read", time.perf_counter() - started)
    ids, sims = _search(tables, slot, rows, cfg, device, stats, search)
    stats.notes.setdefault("mean_kth_similarity", {})[slot.name] = float(sims[:, -1].mean())
    return lists_table(image_ids, slot, ids, sims, cfg.method, vectors.spec)


def compute_and_write(tables: RunTables, slots: list[Slot], image_ids: pa.Array, cfg: NeighboursConfig,
                      device: str, stats: StageStats, search: TopkSearch) -> int:
    """Search each of ``slots`` over ``image_ids`` (exact: through ``search``), one slot's vectors at a time, and
    replace that slot's rows of ``neighbours`` with one write; rows written."""
    n = len(image_ids)
    if device == "cpu" and cfg.method == "exact" and n > CPU_EXACT_WARN:
        log.warning("exact neighbours of %d images on the CPU will take long; use a GPU or neighbours.method: ann",
                    n)
    log.info("neighbours: %d images embedded by every model; computing %s; k=%d, %s on %s", n,
             ", ".join(slot.name for slot in slots), cfg.k, cfg.method, device)
    if tables.exists(NEIGHBOURS) and not set(NEIGHBOURS_STORED_SCHEMA.names) <= set(
            tables.db.open_table(NEIGHBOURS).schema.names):
        tables.db.drop_table(NEIGHBOURS)
    written = 0
    for slot in slots:
        rows = _slot_lists(tables, slot, image_ids, cfg, device, stats, search)
        started = time.perf_counter()
        tables.replace_where(NEIGHBOURS, rows, NEIGHBOURS_STORED_SCHEMA, slot.where())
        stats.add_time("write", time.perf_counter() - started)
        written += rows.num_rows
    return written


def run_neighbours(config: Config, tables: RunTables,
                   runner: LazyRunner | LocalRunner | RayRunner | None = None) -> StageStats:
    """Run the neighbours stage over ``config.neighbours``; returns counts, timings and notes (see module doc).

    ``runner`` places the exact search (its ``topk``); None: a runner of its own per ``config.ray``, which
    starts Ray only for a search of at least ``neighbours.ray_min_images`` images and stops it afterwards.
    Counts: ``images`` (embedded by every model), ``images_<slot>`` and ``left_out_<slot>`` (embedded by that
    model but not by all), ``rows_written``. Notes: k, method, device, the models, ``reused`` (whether every
    slot's lists were reused), ``computed`` (the slots whose lists were computed), ``recall_at_k`` (ann),
    ``search`` (per slot: where the exact search ran, on how many workers).
    """
    cfg = config.neighbours
    stats = StageStats(STAGE)
    started = time.perf_counter()
    slots = slots_of(config)
    embedded = {slot.name: load_ids(tables, slot.role, slot.spec) for slot in slots}
    image_ids = common_ids(embedded)
    n = len(image_ids)
    for name, ids in embedded.items():
        stats.add_count(f"images_{name}", len(ids.ids))
        stats.add_count(f"left_out_{name}", len(ids.ids) - n)
    stats.add_count("images", n)
    stats.add_time("read", time.perf_counter() - started)
    check_size(n, cfg.k)
    device = resolve_device(cfg.device)
    specs = {name: ids.spec for name, ids in embedded.items()}
    stats.notes.update(k=cfg.k, method=cfg.method, device=device, models=specs,
                       specs={slot.name: slot.spec for slot in slots},
                       population=(f"the {n} images embedded by every model (their intersection), so the "
                                   "neighbour lists of an image are drawn from the same pool"))
    stale = [slot for slot in slots
             if not is_up_to_date(tables, slot, image_ids, cfg.k, cfg.method, specs[slot.name])]
    reused = [slot.name for slot in slots if slot not in stale]
    if reused:
        log.info("neighbours: the table already holds k=%d %s neighbours of these %d images for %s; reused", cfg.k,
                 cfg.method, n, ", ".join(reused))
    stats.notes["reused"] = not stale
    stats.notes["computed"] = [slot.name for slot in stale]
    stats.notes["computed_clip_models"] = [slot.clip_model for slot in stale if slot.role == "clip"]
    if stale:
        with ExitStack() as stack:
            if runner is None:
                from clipaudit.runtime import LazyRunner

                runner = LazyRunner(config)
                stack.callback(runner.close)
            search = stack.enter_context(runner.topk(cfg))
            stats.add_count("rows_written", compute_and_write(tables, stale, image_ids, cfg, device, stats, search))
    else:
        stats.add_count("rows_written", 0)
    stats.add_time("wall", time.perf_counter() - started)
    return stats
