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

The package: :mod:`~clipaudit.stages.neighbours.slots` (the stage's name, error and slots),
:mod:`~clipaudit.stages.neighbours.vectors` (a role's ids and vectors in memory),
:mod:`~clipaudit.stages.neighbours.reading` (reading them from the embedding tables, chunk by chunk),
:mod:`~clipaudit.stages.neighbours.search` (one slot's search: device, exact or
:mod:`~clipaudit.stages.neighbours.ann`), :mod:`~clipaudit.stages.neighbours.rows` (a slot's rows of the table and
whether the stored ones are current); this module loads, plans and runs the stage, one slot at a time.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pyarrow as pa

from clipaudit.records import IMAGE_EMBEDDINGS, NEIGHBOURS, NEIGHBOURS_STORED_SCHEMA, StageStats
from clipaudit.stages.neighbours.ann import ANN_QUERY_BATCH, ann_neighbours, recall_at_k
from clipaudit.stages.neighbours.reading import Ragged, embedding_dataset, load_ids, read_chunked, read_whole
from clipaudit.stages.neighbours.rows import is_up_to_date, lists_table
from clipaudit.stages.neighbours.search import resolve_device, search_slot
from clipaudit.stages.neighbours.slots import STAGE, NeighboursError, Slot, check_size, slots_of
from clipaudit.stages.neighbours.vectors import (
    RoleIds,
    RoleVectors,
    common_ids,
    normalise,
    normalise_in_place,
    restrict,
    vector_matrix,
)

if TYPE_CHECKING:
    from clipaudit.config import Config, NeighboursConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import LazyRunner, LocalRunner, RayRunner, TopkSearch

log = logging.getLogger("clipaudit.neighbours")
__all__ = [
    "ANN_QUERY_BATCH", "CPU_EXACT_WARN", "READ_CHUNK_BYTES", "STAGE", "NeighboursError", "RoleIds", "RoleVectors",
    "Slot", "ann_neighbours", "check_size", "common_ids", "compute_and_write", "is_up_to_date", "lists_table",
    "load_ids", "load_vectors", "normalise", "normalise_in_place", "recall_at_k", "resolve_device", "restrict",
    "run_neighbours", "slots_of", "vector_matrix",
]
CPU_EXACT_WARN = 250_000
"""Images above which exact search on a CPU takes hours: the stage warns and suggests a GPU or ``ann``."""
READ_CHUNK_BYTES = 8 << 20
"""Vector bytes read per ``take`` when loading a role: the loader holds its float32 matrix and a few times this
more (a larger read makes lance hold several times it; a scan holds a whole data page, up to the column). Read by
:func:`load_vectors` at each call."""


def load_vectors(tables: RunTables, role: str, spec: str | None = None) -> RoleVectors:
    """Read one model's embeddings, L2-normalised (``spec`` picks the model of the role, as written in the config;
    None: the table's only one); NeighboursError when there are none ("run embed first") or they are unusable.
    The vectors are read in chunks into one preallocated float32 matrix: the peak is that matrix and a few times
    :data:`READ_CHUNK_BYTES` more. Where one model's vectors differ in length (variable-size lists: a role's table
    holds several models), the table is read whole to name them."""
    name = IMAGE_EMBEDDINGS[role]
    dataset = embedding_dataset(tables, role)
    kind = dataset.schema.field("vector").type
    try:
        ids, resolved, vectors = read_chunked(dataset, name, kind.list_size if pa.types.is_fixed_size_list(kind)
                                              else None, role, spec, READ_CHUNK_BYTES)
    except Ragged:
        ids, resolved, vectors = read_whole(dataset, name, role, spec)
    return RoleVectors(role, resolved, ids, vectors)


def _slot_lists(tables: RunTables, slot: Slot, image_ids: pa.Array, cfg: NeighboursConfig, device: str,
                stats: StageStats, search: TopkSearch) -> pa.Table:
    """Load one slot's vectors, search them over ``image_ids`` and return its rows of the table; the vectors are
    released when it returns."""
    started = time.perf_counter()
    vectors = load_vectors(tables, slot.role, slot.spec)
    rows = restrict(vectors, image_ids)
    stats.add_time("read", time.perf_counter() - started)
    ids, sims = search_slot(tables, slot, rows, cfg, device, stats, search)
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
