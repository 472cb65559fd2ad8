"""Tcac stage: Transformative Caption Analysis (the paper's section 3.2), how CLIP's caption ranking moves when
an image is transformed.

For every image: a caption pool (its own captions, plus for each of them its ``tcac.pool_neighbours`` nearest
captions of the corpus by CLIP text embedding, deduplicated), CLIP's probabilities over the pool for the
original image and for each transform of ``tcac.transforms``, and the comparison of the two top-``k`` lists.
The transforms are applied at the CLIP model's input resolution: to the image resized as the model's
preprocessing resizes it, before its centre crop (:mod:`clipaudit.model_view`).

Nothing is computed twice. Caption vectors come from ``caption_embeddings`` (only captions missing there are
encoded, each unique text once, and counted as ``text_encodings``), the original's vector from
``image_embeddings_clip`` when it holds the same model; the transformed images go through the runner (read,
decode and resize once per image as CPU tasks; the transforms, as batched tensor operations, and the forwards in
the CLIP actor pool, on its device). The stage is the single writer of ``tcac_cases`` (keyed by image_id,
transform: a re-run computes only the missing pairs) and ``tcac_summary`` (recomputed), and of ``rejects`` rows
for images it could not read, resize, transform or embed (one row per image, naming the first failure).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from clipaudit.batches.embed import OK, Batch
from clipaudit.batches.isolation import LOST_BEFORE, LOST_FLAG, reopen_retryable
from clipaudit.batches.tcac import ORIGINAL
from clipaudit.errors import ClipauditError
from clipaudit.models.precomputed import is_precomputed
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    DAF_CASES,
    IMAGE_EMBEDDINGS,
    REJECTS,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    SAMPLES,
    TCAC_CASES,
    TCAC_CASES_KEY,
    TCAC_CASES_SCHEMA,
    TCAC_SUMMARY,
    TCAC_SUMMARY_SCHEMA,
    StageStats,
)
from clipaudit.stages.reject_limit import check_reject_share
from clipaudit.stages.upstream import empty_input_message, model_view
from clipaudit.tcac_scoring import (
    CaptionCorpus,
    CaptionPools,
    caption_key,
    caption_keys,
    caption_pools,
    compare,
    corpus_of,
    first_rows,
    mark_cases,
    pool_probabilities,
    summarize,
)

if TYPE_CHECKING:
    from clipaudit.config import Config, EmbedConfig, NeighboursConfig, TcacConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import Preprocess, ResolvedModel
    from clipaudit.runtime import TopkSearch

log = logging.getLogger("clipaudit.tcac")
STAGE = "tcac"


class TcacError(ClipauditError, RuntimeError):
    """The tcac stage cannot run as configured (the message says why and what to do)."""


class Runner(Protocol):
    """What the tcac stage needs from a scheduler (see :mod:`clipaudit.runtime`)."""

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """Yield embedded (image, transform) batches for ``todo`` (image_id, uri, transforms)."""
        ...

    def map_texts(self, captions: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Yield batches of caption vectors."""
        ...

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches (the caption pools), in-process or on Ray actors."""
        ...


def resolve_clip(config: Config) -> ResolvedModel:
    """The CLIP-role model of the config, resolved on the driver (weights checked, nothing loaded)."""
    from clipaudit.models import resolve_model

    m = config.models
    return resolve_model(m.clip, "clip", fallback=m.fallback, cache_dir=m.cache_dir)


def settings_for(tcac: TcacConfig, transform: str, preprocess: Preprocess) -> str:
    """JSON of everything configured that a row of ``transform`` depends on (the ``settings`` column): the tcac
    settings and, under ``input``, the model's resize (the resolution the transform was applied at)."""
    from clipaudit.transforms.severities import graded_settings, is_graded

    params = graded_settings(transform) if is_graded(transform) else tcac.params.values(transform)
    return json.dumps({"seed": tcac.seed, "pool_neighbours": tcac.pool_neighbours, "top_k": tcac.top_k,
                       "params": params, "input": input_settings(preprocess)},
                      sort_keys=True)


def input_settings(preprocess: Preprocess) -> dict[str, Any]:
    """The fields of the model's preprocessing that fix the pixels a transform is applied to and cropped from."""

    return {"image_size": preprocess.image_size, "resize_size": preprocess.resize_size,
            "resize_mode": preprocess.resize_mode, "interpolation": preprocess.interpolation,
            "style": preprocess.style}


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A vector column (fixed- or variable-size lists of one length) as a float32 ``(n, d)`` array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(array), len(values) // max(len(array), 1))


def _check_existing(existing: pa.Table | None, spec: str, tcac: TcacConfig, preprocess: Preprocess,
                    uri: str) -> set[tuple[str, str]]:
    """The finished (image_id, transform) pairs; TcacError when they were made by another model or settings."""
    if existing is None or existing.num_rows == 0:
        return set()
    models = set(pc.unique(existing.column("model")).to_pylist())
    if models != {spec}:
        raise TcacError(f"{TCAC_CASES} in {uri} holds rows of {sorted(models)}, but the CLIP model is {spec!r}: "
                        "use a new run_dir for a different model")
    transforms = existing.column("transform").to_pylist()
    settings = existing.column("settings").to_pylist()
    for transform in sorted(set(transforms) & set(tcac.transforms)):
        found = {s for t, s in zip(transforms, settings) if t == transform}
        wanted = settings_for(tcac, transform, preprocess)
        if found != {wanted}:
            raise TcacError(f"{TCAC_CASES} in {uri} holds {transform!r} rows made with {sorted(found)[0]}, but "
                            f"the config now gives {wanted}: use a new run_dir for different tcac settings")
    return set(zip(existing.column("image_id").to_pylist(), transforms))


def plan_pairs(tables: RunTables, samples: pa.Table, tcac: TcacConfig, model: ResolvedModel) -> dict[str, list[str]]:
    """image_id -> the configured transforms it still lacks in ``tcac_cases`` (images rejected by the embed or
    tcac stage are left out), in image_id order."""
    existing = tables.read(TCAC_CASES, ["image_id", "transform", "model", "settings"])
    done = _check_existing(existing, model.spec, tcac, model.preprocess, tables.uri)
    rejected = tables.read(REJECTS, ["item"], where=f"stage = 'embed' OR stage = '{STAGE}'")
    skip = set(rejected.column("item").to_pylist()) if rejected is not None else set()
    todo: dict[str, list[str]] = {}
    for image_id in sorted(samples.column("image_id").to_pylist()):
        if image_id in skip:
            continue
        missing = [t for t in tcac.transforms if (image_id, t) not in done]
        if missing:
            todo[image_id] = missing
    return todo


def load_corpus(tables: RunTables, samples: pa.Table, runner: Runner, model: ResolvedModel, embed: EmbedConfig,
                stats: StageStats) -> CaptionCorpus:
    """Every unique caption of the corpus (by key, first seen first) with its CLIP text vector.

    Vectors are taken from ``caption_embeddings``; a caption without one there is encoded through the
    runner's text actor pool, each unique text once (counted as ``text_encodings``). Texts and keys stay Arrow
    arrays: nothing is held per caption as a Python object.
    """
    flat = pc.list_flatten(samples.column("captions"))
    all_keys = caption_keys(flat)
    keys = pc.unique(all_keys)
    texts = pa.concat_arrays(flat.chunks).take(pa.array(first_rows(keys, all_keys), pa.int64())) \
        if flat.num_chunks else pa.array([], pa.string())
    del all_keys
    at, vectors = _stored_vectors(tables, keys, model.spec)
    missing = np.flatnonzero(at < 0)
    stats.add_count("unique_captions", len(keys))
    stats.add_count("text_encodings", len(missing))
    if not len(missing):
        return corpus_of(texts, vectors, keys)
    log.warning("%d of %d unique captions have no vector in %s (run the embed stage first to reuse them); "
                "encoding them now", len(missing), len(keys), CAPTION_EMBEDDINGS)
    encoded = _encode(runner, texts.take(pa.array(missing, pa.int64())).to_pylist(), model, embed, stats)
    dim = vectors.shape[1] if len(vectors) else len(next(iter(encoded.values()), []))
    full = np.zeros((len(keys), dim), np.float32)
    keep = at >= 0
    if len(vectors):
        full[keep] = vectors
    for row, key in zip(missing.tolist(), keys.take(pa.array(missing, pa.int64())).to_pylist()):
        if key in encoded:
            full[row], keep[row] = encoded[key], True
    failed = missing[~keep[missing]]
    if len(failed):
        log.warning("%d caption(s) failed the text forward and are left out of the caption pools (e.g. %r)",
                    len(failed), texts[int(failed[0])].as_py()[:80])
        stats.add_count("captions_rejected", len(failed))
    mask = pa.array(keep, pa.bool_())
    return corpus_of(texts.filter(mask), full[keep] if len(failed) else full, keys.filter(mask))


def _stored_vectors(tables: RunTables, keys: pa.Array, spec: str) -> tuple[np.ndarray, np.ndarray]:
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


def _encode(runner: Runner, texts: list[str], model: ResolvedModel, embed: EmbedConfig,
            stats: StageStats) -> dict[str, np.ndarray]:
    """Vectors of ``texts`` (captions missing in ``caption_embeddings``) by key, through the runner's text actor
    pool; texts whose forward failed are absent."""
    start = time.perf_counter()
    encoded: dict[str, np.ndarray] = {}
    for batch in runner.map_texts(pa.table({"text": pa.array(texts, pa.string())}), model, embed):
        if LOST_FLAG in batch:
            continue
        statuses = batch.get("status", np.full(len(batch["text"]), OK, dtype=object))
        for text, vector, status in zip(batch["text"], np.asarray(batch["vector"], dtype=np.float32), statuses):
            if status == OK:
                encoded[caption_key(str(text))] = vector
    stats.add_time("infer_text", time.perf_counter() - start)
    return encoded


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


class CaseSink:
    """Collects the embedded (image, transform) rows of each image; once an image is complete, scores it
    against its pool and buffers its ``tcac_cases`` rows; writes in few keyed writes."""

    def __init__(self, tables: RunTables, model: ResolvedModel, tcac: TcacConfig, corpus: CaptionCorpus,
                 pools: CaptionPools, gt: np.ndarray, originals: dict[str, np.ndarray],
                 expected: dict[str, list[str]], uris: dict[str, str], write_every: int,
                 stats: StageStats) -> None:
        self.tables, self.model, self.tcac, self.corpus = tables, model, tcac, corpus
        self.pools, self.gt, self.originals, self.expected, self.uris = pools, gt, originals, expected, uris
        self.write_every, self.stats = write_every, stats
        self.pending: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
        self.rejected: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, str]] = []
        self.settings = {t: settings_for(tcac, t, model.preprocess) for t in tcac.transforms}

    def add(self, batch: Batch) -> int:
        """Take one embedded batch; returns the number of images it completed."""
        if LOST_FLAG in batch:
            for image_id, status, detail in zip(batch["image_id"].tolist(), batch["status"].tolist(),
                                                batch["detail"].tolist()):
                self._reject(str(image_id), str(status), str(detail))
            return len(batch["image_id"])
        for phase in ("read", "decode", "resize", "transform"):
            self.stats.add_time(phase, float(np.sum(batch[f"t_{phase}"])))
        self.stats.add_time("infer_clip", float(np.sum(batch["t_infer_clip"])))
        for transform, seconds in zip(batch["transform"], batch["t_transform"]):
            self.stats.add_time(f"transform_{transform}", float(seconds))
        vectors = np.asarray(batch["vector_clip"], dtype=np.float32)
        logit_scale = float(batch["logit_scale"][0]) if len(vectors) else float("nan")
        logit_bias = float(batch["logit_bias"][0]) if len(vectors) and "logit_bias" in batch else float("nan")
        completed = 0
        for i in range(len(vectors)):
            image_id, transform = str(batch["image_id"][i]), str(batch["transform"][i])
            if image_id in self.rejected:
                continue
            if batch["status"][i] != OK:
                self._reject(image_id, str(batch["status"][i]), str(batch["detail"][i]))
                continue
            self.stats.add_count("encoded_original" if transform == ORIGINAL else "encoded_transformed")
            parts = self.pending.setdefault(image_id, {})
            parts[transform] = (vectors[i], str(batch["params"][i]))
            if len(parts) == len(self.expected[image_id]):
                start = time.perf_counter()
                self.rows.extend(self._score(image_id, self.pending.pop(image_id), logit_scale, logit_bias))
                self.stats.add_time("score", time.perf_counter() - start)
                completed += 1
        if len(self.rows) >= self.write_every:
            self.flush()
        return completed

    def _reject(self, image_id: str, reason: str, detail: str) -> None:
        """The image leaves the stage: one ``rejects`` row, its pending parts dropped."""
        if image_id in self.rejected:
            return
        self.rejected.add(image_id)
        self.pending.pop(image_id, None)
        self.rejects.append({"source": self.uris.get(image_id, ""), "item": image_id, "stage": STAGE,
                             "reason": reason, "detail": detail})

    def _score(self, image_id: str, parts: dict[str, tuple[np.ndarray, str]],
               logit_scale: float, logit_bias: float = float("nan")) -> list[dict[str, Any]]:
        at = self.pools.position(image_id)
        pool = self.pools.pool(at)
        original = self.originals[image_id] if image_id in self.originals else parts[ORIGINAL][0]
        transforms = [t for t in self.expected[image_id] if t != ORIGINAL]
        probs = pool_probabilities(np.stack([original] + [parts[t][0] for t in transforms]),
                                   self.corpus.vectors[pool], logit_scale, logit_bias)
        gt_row = int(self.gt[at])
        where = np.flatnonzero(pool == gt_row) if gt_row >= 0 else np.zeros(0, np.int64)
        gt = int(where[0]) if len(where) else None
        texts = self.corpus.texts.take(pool)
        rows = []
        for j, transform in enumerate(transforms, start=1):
            c = compare(probs[0], probs[j], self.tcac.top_k, gt)
            rows.append({
                "image_id": image_id, "transform": transform, "model": self.model.spec,
                "params": parts[transform][1], "settings": self.settings[transform], "pool_size": len(pool),
                "top_before": [texts[i] for i in c.top_before], "probs_before": c.probs_before,
                "top_after": [texts[i] for i in c.top_after], "probs_after": c.probs_after,
                "changed": c.changed, "top1_changed": c.top1_changed,
                "gt_caption": texts[gt] if gt is not None else None,
                "gt_rank_before": c.gt_rank_before, "gt_rank_after": c.gt_rank_after,
                "gt_prob_before": c.gt_prob_before, "gt_prob_after": c.gt_prob_after,
                "tv_distance": c.tv_distance, "rank": 0, "is_case": False, "daf_case": False,
            })
        return rows

    def flush(self) -> None:
        """Write the buffered case rows and rejects (keyed: nothing is written twice)."""
        start = time.perf_counter()
        if self.rows:
            rows = pa.Table.from_pylist(self.rows, schema=TCAC_CASES_SCHEMA)
            self.stats.add_count("pairs_written", self.tables.insert_new(TCAC_CASES, rows, TCAC_CASES_KEY,
                                                                         TCAC_CASES_SCHEMA))
            self.rows.clear()
        if self.rejects:
            rejects = pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)
            self.stats.add_count("rejected", self.tables.insert_new(REJECTS, rejects, REJECTS_KEY, REJECTS_SCHEMA))
            self.rejects.clear()
        self.stats.add_time("write", time.perf_counter() - start)

    def close(self) -> None:
        """Flush; an image with rows still missing is a bug in the runner."""
        self.flush()
        if self.pending:
            raise RuntimeError(f"tcac: {len(self.pending)} images came back incomplete from the runner, "
                               f"e.g. {next(iter(self.pending))!r}")


def score_missing(config: Config, tables: RunTables, runner: Runner, model: ResolvedModel, samples: pa.Table,
                  todo: dict[str, list[str]], stats: StageStats, lost_before: set[str] | None = None) -> None:
    """Pools, originals and the runner's transformed vectors for the (image, transform) pairs in ``todo``
    (``lost_before``: images an earlier run rejected as ``worker_lost``, tried again now)."""
    lost_before = lost_before or set()
    tcac = config.tcac
    start = time.perf_counter()
    corpus = load_corpus(tables, samples, runner, model, config.embed, stats)
    ids = pa.array(list(todo), pa.string())
    todo_samples = samples.take(pa.array(first_rows(ids, samples.column("image_id").combine_chunks()), pa.int64()))
    own = corpus.rows_of(todo_samples.column("captions"))
    gt = corpus.find(pc.fill_null(todo_samples.column("caption"), ""))
    stats.add_time("corpus", time.perf_counter() - start)
    empty = own.sizes() == 0
    if empty.any():
        no_pool = sorted(ids.filter(pa.array(empty, pa.bool_())).to_pylist())
        log.warning("%d images have no caption to build a pool from (e.g. %s); skipped", len(no_pool), no_pool[0])
        keep = np.flatnonzero(~empty)
        ids, own, gt = ids.take(pa.array(keep, pa.int64())), own.take(keep), gt[keep]
        todo_samples = todo_samples.take(pa.array(keep, pa.int64()))
        todo = {image_id: todo[image_id] for image_id in ids.to_pylist()}
    start = time.perf_counter()
    with runner.topk(config.neighbours) as search:
        pools = caption_pools(corpus, own, tcac.pool_neighbours, topk=search.cross_topk, image_ids=ids)
    stats.notes["pool_search"] = dict(search.notes)
    stats.add_time("pools", time.perf_counter() - start)
    if len(pools):
        stats.notes["mean_pool_size"] = round(float(np.mean(pools.sizes())), 2)
    uris = dict(zip(ids.to_pylist(), todo_samples.column("uri").to_pylist()))
    originals = load_originals(tables, model.spec, set(todo))
    stats.add_count("originals_reused", len(originals))
    expected = {image_id: ([] if image_id in originals else [ORIGINAL]) + names for image_id, names in todo.items()}
    work = pa.table({"image_id": list(expected), "uri": [uris[i] for i in expected],
                     "transforms": [",".join(names) for names in expected.values()],
                     LOST_BEFORE: [image_id in lost_before for image_id in expected]})
    sink = CaseSink(tables, model, tcac, corpus, pools, gt, originals, expected, uris, config.embed.write_every,
                    stats)
    with tqdm(total=len(expected), unit="image", desc="tcac images", dynamic_ncols=True) as bar:
        for batch in runner.map_transformed(work, model, tcac, config.embed):
            bar.update(sink.add(batch))
    sink.close()


CASE_COLUMNS = ("image_id", "transform", "model", "changed", "tv_distance", "top1_changed", "gt_rank_before",
                "gt_rank_after", "rank", "is_case", "daf_case")
"""The columns of ``tcac_cases`` that :func:`finalize` reads (about 60 bytes a row instead of about 2 KB)."""

MARKS = ("rank", "is_case", "daf_case")
"""The columns :func:`finalize` sets."""

REWRITE_ROWS = 16_384
"""Rows of ``tcac_cases`` the rewrite of :func:`finalize` holds at a time."""


def finalize(tables: RunTables, tcac: TcacConfig, stats: StageStats) -> pa.Table | None:
    """Sort and mark ``tcac_cases`` (rank, is_case, daf_case) and recompute ``tcac_summary``; each table is
    rewritten only when its content changed. Returns the summary (None when there are no cases).

    Only the narrow :data:`CASE_COLUMNS` are read; the rewrite streams the table in sorted order,
    :data:`REWRITE_ROWS` rows at a time."""
    start = time.perf_counter()
    cases = tables.read(TCAC_CASES, CASE_COLUMNS)
    if cases is None:
        return None
    cases = cases.cast(pa.schema([TCAC_CASES_SCHEMA.field(name) for name in CASE_COLUMNS]))
    daf = tables.read(DAF_CASES, ["image_id"]) if tables.exists(DAF_CASES) else None
    daf_ids = daf.column("image_id").combine_chunks() if daf is not None else pa.array([], pa.string())
    positions = pa.array(np.arange(cases.num_rows, dtype=np.int64))
    marked = mark_cases(cases.append_column("position", positions), tcac.cases_per_transform, daf_ids,
                        tcac.transforms)
    if not (marked.column("position").equals(pa.chunked_array([positions]))
            and marked.select(MARKS).equals(cases.select(MARKS))):
        rewrite_cases(tables, marked)
        stats.add_count("cases_rewritten", marked.num_rows)
    summary = summarize(marked, tcac.transforms)
    old = tables.read(TCAC_SUMMARY)
    if old is None or not old.select(TCAC_SUMMARY_SCHEMA.names).cast(TCAC_SUMMARY_SCHEMA).equals(summary):
        tables.replace(TCAC_SUMMARY, summary, TCAC_SUMMARY_SCHEMA)
    both = pc.and_(marked.column("is_case"), marked.column("daf_case"))
    stats.counts.update(total_pairs=marked.num_rows, total_cases=int(pc.sum(marked.column("is_case")).as_py() or 0),
                        total_daf_cases=pc.count_distinct(pc.filter(marked.column("image_id"), both)).as_py())
    stats.add_time("finalize", time.perf_counter() - start)
    return summary


def rewrite_cases(tables: RunTables, marked: pa.Table) -> None:
    """Rewrite (this model's rows of) ``tcac_cases`` in ``marked``'s order (its ``position`` column: positions among
    the rows :meth:`~clipaudit.io.tables.RunTables.read` returns) with ``marked``'s marks, streamed from the current
    version in batches of :data:`REWRITE_ROWS`."""
    dataset = tables.db.open_table(TCAC_CASES).to_lance()
    positions = tables.positions(TCAC_CASES)
    reader = pa.RecordBatchReader.from_batches(TCAC_CASES_SCHEMA, _marked_batches(dataset, marked, positions))
    tables.rewrite(TCAC_CASES, reader)


def _marked_batches(dataset: Any, marked: pa.Table, positions: np.ndarray | None) -> Iterator[pa.RecordBatch]:
    """The rows of ``dataset`` at ``marked``'s positions (mapped through ``positions``, the dataset positions of
    the rows read, when not None), in that order, with ``marked``'s marks set."""
    names = TCAC_CASES_SCHEMA.names
    for start in range(0, marked.num_rows, REWRITE_ROWS):
        part = marked.slice(start, REWRITE_ROWS)
        at = part.column("position").to_numpy()
        rows = dataset.take((at if positions is None else positions[at]).tolist(), columns=names)
        for name in MARKS:
            rows = rows.set_column(rows.schema.get_field_index(name), name, part.column(name))
        yield from rows.select(names).cast(TCAC_CASES_SCHEMA).to_batches()


def run_tcac(config: Config, tables: RunTables, runner: Runner, model: ResolvedModel | None = None) -> StageStats:
    """Run the tcac stage: score the missing (image, transform) pairs, then re-mark the cases and recompute the
    summary. ``model`` is the resolved CLIP-role model (resolved from ``config.models`` when None)."""
    tables = model_view(tables, config)
    stats = StageStats(STAGE)
    started = time.perf_counter()
    model = model if model is not None else resolve_clip(config)
    if is_precomputed(model):
        reason = (f"{model.requested_spec}: its vectors are precomputed (read from a clip-retrieval index), with no "
                  "weights to embed transformed images; name the model the index was built with to run TCAC")
        log.warning("tcac: skipped: %s", reason)
        stats.add_time("wall", time.perf_counter() - started)
        stats.notes.update(model=model.spec, skipped=reason,
                           summary="tcac: skipped (precomputed CLIP vectors: no model to embed transformed images)")
        return stats
    samples = tables.read(SAMPLES, ["image_id", "uri", "captions", "caption"])
    if samples is None or samples.num_rows == 0:
        raise TcacError(empty_input_message(tables, f"no samples in {tables.uri}", "ingest", SAMPLES))
    start = time.perf_counter()
    lost_before = reopen_retryable(tables, STAGE)
    stats.add_count("retried", len(lost_before))
    todo = plan_pairs(tables, samples, config.tcac, model)
    stats.add_time("plan", time.perf_counter() - start)
    stats.add_count("images_todo", len(todo))
    stats.add_count("pairs_todo", sum(len(names) for names in todo.values()))
    stats.add_count("text_encodings", 0)
    if todo:
        score_missing(config, tables, runner, model, samples, todo, stats, lost_before)
    summary = finalize(tables, config.tcac, stats)
    rejected = account(tables, stats)
    stats.add_time("wall", time.perf_counter() - started)
    stats.notes.update(model=model.spec, random_model=model.is_random, device=getattr(runner, "device", "cpu"),
                       summary=summary_line(stats, summary))
    c = stats.counts
    check_reject_share(STAGE, c["images_scored"] + c["images_rejected"], rejected, config.embed.max_reject_share,
                       "images")
    return stats


def account(tables: RunTables, stats: StageStats) -> list[dict[str, Any]]:
    """Image-level accounting into ``stats.counts``: ``images_in`` (samples the embed stage did not reject),
    ``images_scored`` (with rows in ``tcac_cases``), ``images_rejected`` (a ``rejects`` row of this stage); returns
    those rejects (item, reason, detail)."""
    samples = set(tables.read(SAMPLES, ["image_id"]).column("image_id").to_pylist())
    rejects = tables.read(REJECTS, ["item", "stage", "reason", "detail"],
                          where=f"stage = 'embed' OR stage = '{STAGE}'")
    rows = rejects.to_pylist() if rejects is not None else []
    eligible = samples - {r["item"] for r in rows if r["stage"] == "embed"}
    mine = sorted((r for r in rows if r["stage"] == STAGE and r["item"] in eligible), key=lambda r: r["item"])
    cases = tables.read(TCAC_CASES, ["image_id"])
    scored = eligible & set(cases.column("image_id").to_pylist()) if cases is not None else set()
    stats.counts.update(images_in=len(eligible), images_scored=len(scored), images_rejected=len(mine))
    return mine


def summary_line(stats: StageStats, summary: pa.Table | None) -> str:
    """One line: images in = scored + rejected, what this run did, text encodings against unique captions, and mean
    changed per transform."""
    c = stats.counts
    done = (f"{c.get('pairs_written', 0)} new (image, transform) rows of {c.get('pairs_todo', 0)} to do"
            if c.get("pairs_todo") else "nothing left to do, no new rows")
    n_in, scored, rejected = (c.get(k, 0) for k in ("images_in", "images_scored", "images_rejected"))
    line = f"tcac: {n_in} in = {scored} scored + {rejected} rejected"
    if n_in - scored - rejected:
        line += f" + {n_in - scored - rejected} not scored (no caption to build a pool from, or not run yet)"
    line += (f"; {done}; {c.get('total_pairs', 0)} rows, {c.get('total_cases', 0)} cases "
             f"({c.get('total_daf_cases', 0)} images of them also DAF cases)")
    if "unique_captions" in c:
        line += f"; text encodings {c['text_encodings']} for {c['unique_captions']} unique captions"
    if summary is not None and summary.num_rows:
        means = ", ".join(f"{t} {m:.2f}" for t, m in zip(summary.column("transform").to_pylist(),
                                                         summary.column("mean_changed").to_pylist()))
        line += f"; mean changed: {means}"
    return line
