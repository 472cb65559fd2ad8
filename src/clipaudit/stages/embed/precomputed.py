"""Precomputed CLIP vectors: a ``precomputed:INDEX_DIR`` model's vectors read from its clip-retrieval index
instead of computed (:mod:`clipaudit.models.precomputed`), checked (alignment with the metadata rows, dtype, one
dimension, norms) and written as the computed ones are."""


from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from clipaudit.io.readers.common import basename
from clipaudit.models.precomputed import NpyShard, PrecomputedIndexError, index_shards
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    CLIP_MODEL,
    REJECTS,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    StageStats,
    caption_embeddings_schema,
    image_embeddings_schema,
    vector_array,
    with_clip_model,
)
from clipaudit.stages.embed.plan import STAGE, plan_captions, plan_images, table_of

if TYPE_CHECKING:
    from clipaudit.config import EmbedConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.embed")


NORM_TOLERANCE = 1e-2
"""A precomputed vector whose L2 norm is further than this from 1 is counted as ``renormalised``."""
BAD_VECTOR = "bad_precomputed_vector"
NO_VECTOR = "no_precomputed_vector"


def checked_vectors(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit float32 rows, rows that are zero or not finite, rows whose norm was off 1 by more than
    :data:`NORM_TOLERANCE`) of a block of precomputed vectors; every usable row is normalised again in float32."""
    rows = np.asarray(vectors, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(rows, axis=1)
        bad = ~np.isfinite(norms) | (norms == 0) | ~np.isfinite(rows).all(axis=1)
        off = ~bad & (np.abs(norms - 1) > NORM_TOLERANCE)
        unit = rows / np.where(bad, np.float32(1), norms)[:, None]
    unit[bad] = 0
    return unit.astype(np.float32, copy=False), bad, off


def _check_shard(array: NpyShard, rows: int, metadata: str, dim: int | None) -> None:
    """PrecomputedIndexError naming both files unless ``array`` holds ``rows`` float16/float32 vectors of ``dim``."""
    if len(array.shape) != 2 or array.shape[0] != rows:
        raise PrecomputedIndexError(f"{array.path} has shape {array.shape} but {metadata} has {rows} rows: the "
                                    "vectors and the metadata of a clip-retrieval shard must align row by row")
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4):
        raise PrecomputedIndexError(f"{array.path} holds {array.dtype} values, expected float16 or float32")
    if dim is not None and array.shape[1] != dim:
        raise PrecomputedIndexError(f"{array.path} holds vectors of dimension {array.shape[1]}, the index's first "
                                    f"shard {dim}: all vectors of one index must have one dimension")


class PrecomputedSink:
    """The rows one precomputed CLIP-role model adds: image vectors, caption vectors and rejects, written in few
    large keyed writes (as :class:`ImageSink` and :class:`CaptionSink` write theirs); counts everything."""

    def __init__(self, tables: RunTables, slot: str, model: ResolvedModel, write_every: int,
                 stats: StageStats) -> None:
        self.tables, self.slot, self.model, self.write_every, self.stats = tables, slot, model, write_every, stats
        self.images: list[pa.Table] = []
        self.captions: list[pa.Table] = []
        self.rejects: dict[str, list[dict[str, str]]] = {"rejected": [], "rejected_captions": []}
        self.buffered = 0

    def add_images(self, image_ids: list[str], vectors: np.ndarray) -> None:
        """Buffer the unit vectors of ``image_ids``."""
        n = len(image_ids)
        self.images.append(pa.table({
            "image_id": pa.array(image_ids, pa.string()),
            "model": pa.array([self.model.spec] * n, pa.string()),
            "vector": vector_array(vectors),
            CLIP_MODEL: pa.array([self.model.requested_spec] * n, pa.string()),
        }))
        self._buffered(n)

    def add_captions(self, rows: list[tuple[str, str, str]], vectors: np.ndarray) -> None:
        """Buffer caption vectors: ``rows`` of (caption_id, image_id, text), one vector each."""
        n = len(rows)
        self.captions.append(pa.table({
            "caption_id": pa.array([row[0] for row in rows], pa.string()),
            "image_id": pa.array([row[1] for row in rows], pa.string()),
            "text": pa.array([row[2] for row in rows], pa.string()),
            "model": pa.array([self.model.spec] * n, pa.string()),
            "vector": vector_array(vectors),
            CLIP_MODEL: pa.array([self.model.requested_spec] * n, pa.string()),
        }))
        self._buffered(n)

    def reject(self, source: str, item: str, reason: str, detail: str, caption: bool = False) -> None:
        """Buffer a ``rejects`` row of this stage (of an image, or of a caption: ``item`` its caption_id)."""
        self.rejects["rejected_captions" if caption else "rejected"].append(
            {"source": source, "item": item, "stage": STAGE, "reason": reason, "detail": detail})
        self._buffered(1)

    def _buffered(self, n: int) -> None:
        self.buffered += n
        if self.buffered >= self.write_every:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered: image vectors, caption vectors, then rejects."""
        start = time.perf_counter()
        spec = self.model.requested_spec
        if self.images:
            schema = image_embeddings_schema(None).append(pa.field(CLIP_MODEL, pa.string(), nullable=False))
            written = self.tables.insert_new(table_of(self.model), pa.concat_tables(self.images),
                                             ["image_id", CLIP_MODEL], schema)
            self.stats.add_count(f"embedded_{self.slot}", written)
            by_model = self.stats.notes.setdefault("embedded_by_model", {})
            by_model[spec] = by_model.get(spec, 0) + written
            self.images.clear()
        if self.captions:
            written = self.tables.insert_new(CAPTION_EMBEDDINGS, pa.concat_tables(self.captions),
                                             ["caption_id", CLIP_MODEL],
                                             with_clip_model(caption_embeddings_schema(None)))
            self.stats.add_count("embedded_captions", written)
            by_model = self.stats.notes.setdefault("embedded_captions_by_model", {})
            by_model[spec] = by_model.get(spec, 0) + written
            self.captions.clear()
        for count, rows in self.rejects.items():
            if rows:
                rejects = pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
                self.stats.add_count(count, self.tables.insert_new(REJECTS, rejects, REJECTS_KEY, REJECTS_SCHEMA))
                rows.clear()
        self.buffered = 0
        self.stats.add_time("write", time.perf_counter() - start)


class _PrecomputedScan:
    """One pass over a clip-retrieval index for one model: what is still needed, and what was found."""

    def __init__(self, model: ResolvedModel, images: pa.Table, captions: pa.Table, sink: PrecomputedSink) -> None:
        self.model, self.sink = model, sink
        self.uris: dict[str, str] = dict(zip(images.column("image_id").to_pylist(),
                                             images.column("uri").to_pylist()))
        self.captions: dict[str, list[tuple[str, str]]] = {}
        for caption_id, image_id, text in zip(captions.column("caption_id").to_pylist(),
                                              captions.column("image_id").to_pylist(),
                                              captions.column("text").to_pylist()):
            self.captions.setdefault(image_id, []).append((caption_id, text))
        self.renormalised = 0
        self.left_out = 0

    def shard(self, shard: Any) -> None:
        """Read one shard: its metadata rows' ids, then the vectors of the rows still needed (first row wins)."""
        from clipaudit.io.readers.clip_retrieval import (
            CAPTION_COLUMN,
            image_column,
            metadata_batches,
            open_metadata,
            row_image_id,
        )
        from clipaudit.io.readers.common import open_binary

        with ExitStack() as stack:
            parquet = open_metadata(stack.enter_context(open_binary(shard.metadata)), shard.metadata)
            rows, names = parquet.metadata.num_rows, parquet.schema_arrow.names
            image = stack.enter_context(NpyShard(shard.img_emb))
            _check_shard(image, rows, shard.metadata, self.model.dim)
            text = None
            if shard.text_emb is not None and self.captions and CAPTION_COLUMN in names:
                text = stack.enter_context(NpyShard(shard.text_emb))
                _check_shard(text, rows, shard.metadata, self.model.dim)
            column = image_column(shard.metadata, names)
            columns = [column, CAPTION_COLUMN] if text is not None else [column]
            offset = 0
            for batch in metadata_batches(parquet, columns):
                ids = [row_image_id(value) for value in batch.column(0).to_pylist()]
                texts = batch.column(1).to_pylist() if text is not None else None
                self._batch(shard, offset, ids, texts, image, text)
                offset += batch.num_rows

    def _batch(self, shard: Any, offset: int, ids: list[str | None], texts: list[Any] | None, image: NpyShard,
               text: NpyShard | None) -> None:
        wanted_images: list[int] = []
        wanted_texts: list[tuple[int, list[tuple[str, str]]]] = []
        for i, image_id in enumerate(ids):
            if image_id is None:
                continue
            if self.uris.pop(image_id, None) is not None:
                wanted_images.append(i)
            entries = self.captions.pop(image_id, None)
            if entries is not None:
                wanted_texts.append((i, entries))
        if wanted_images:
            block = image.rows(offset, offset + len(ids))
            unit, bad, off = checked_vectors(block[wanted_images])
            self.renormalised += int(off.sum())
            keep = [n for n, flag in enumerate(bad) if not flag]
            self.sink.add_images([ids[wanted_images[n]] for n in keep], unit[keep])
            for n in np.flatnonzero(bad):
                row = wanted_images[n]
                self.sink.reject(shard.img_emb, str(ids[row]), BAD_VECTOR,
                                 f"{basename(shard.metadata)} row {offset + row + 1}: its vector in "
                                 f"{basename(shard.img_emb)} is zero or not finite")
        if wanted_texts:
            self._captions(shard, offset, ids, texts, text, wanted_texts)

    def _captions(self, shard: Any, offset: int, ids: list[str | None], texts: list[Any] | None,
                  text: NpyShard | None, wanted: list[tuple[int, list[tuple[str, str]]]]) -> None:
        """The caption vectors of the ``wanted`` rows (row, its sample's captions still needed): each caption whose
        text is the row's caption gets the row's text vector; the others are left out (counted)."""
        matched: list[tuple[str, str, str]] = []
        sources: list[int] = []
        for row, entries in wanted:
            caption = texts[row].strip() if texts is not None and isinstance(texts[row], str) else None
            for caption_id, value in entries:
                if text is not None and caption is not None and value == caption:
                    matched.append((caption_id, str(ids[row]), value))
                    sources.append(row)
                else:
                    self.left_out += 1
        if not matched or text is None:
            return
        block = text.rows(offset, offset + len(ids))
        unit, bad, off = checked_vectors(block[sources])
        self.renormalised += int(off.sum())
        keep = [n for n, flag in enumerate(bad) if not flag]
        self.sink.add_captions([matched[n] for n in keep], unit[keep])
        for n in np.flatnonzero(bad):
            self.sink.reject(matched[n][1], matched[n][0], BAD_VECTOR,
                             f"{basename(shard.metadata)} row {offset + sources[n] + 1}: its vector in "
                             f"{basename(text.path)} is zero or not finite", caption=True)


def embed_precomputed(tables: RunTables, slot: str, model: ResolvedModel, embed: EmbedConfig,
                      stats: StageStats) -> None:
    """Write the vectors of a ``precomputed:INDEX_DIR`` CLIP-role model from its clip-retrieval index.

    The samples it still lacks (planned from the tables, as for a computed model) are looked up by image_id, each
    metadata row's id derived as the ``clip_retrieval`` reader derives it (the first row of an id wins), and their
    rows read from the memory-mapped ``img_emb`` shards, shard by shard. Every vector is written L2-normalised in
    float32; one whose norm was off 1 by more than :data:`NORM_TOLERANCE` is counted as ``renormalised``, a zero or
    non-finite one is a ``bad_precomputed_vector`` reject, and a sample no row names a ``no_precomputed_vector``
    reject. With ``text_emb`` shards, each caption of a sample that is its row's ``caption`` gets the row's text
    vector in ``caption_embeddings``; the other captions (and all of them without ``text_emb``) have no precomputed
    vector and are left out, counted as ``captions_without_precomputed_vector``. PrecomputedIndexError (naming the
    files) for a shard whose vectors do not align with its metadata rows, or are not float16/float32 of the
    index's one dimension.
    """
    target = model.target
    started = time.perf_counter()
    images = plan_images(tables, {slot: model})
    captions = plan_captions(tables, model)
    stats.add_count("precomputed_images_todo", images.num_rows)
    provenance = {"spec": model.requested_spec, "source": f"precomputed, from {target.index_dir}",
                  "shards": target.shards, "renormalised": 0, "text_vectors": target.has_text}
    stats.notes.setdefault("precomputed", {})[model.requested_spec] = provenance
    if not target.has_text:
        stats.add_count("captions_without_precomputed_vector", captions.num_rows)
        captions = captions.slice(0, 0)
    stats.add_count("precomputed_captions_todo", captions.num_rows)
    if images.num_rows == 0 and captions.num_rows == 0:
        return
    sink = PrecomputedSink(tables, slot, model, embed.write_every, stats)
    scan = _PrecomputedScan(model, images, captions, sink)
    shards = index_shards(target.index_dir)
    for shard in tqdm(shards, unit="shard", desc=f"precomputed {slot}", dynamic_ncols=True, disable=None):
        if not scan.uris and not scan.captions:
            break
        scan.shard(shard)
    for image_id, uri in sorted(scan.uris.items()):
        sink.reject(uri, image_id, NO_VECTOR, f"no row of the clip-retrieval index {target.index_dir} names this "
                                              "image (ids are derived from image_path / url as the clip_retrieval "
                                              "reader derives them)")
    scan.left_out += sum(len(entries) for entries in scan.captions.values())
    sink.flush()
    stats.add_count(f"renormalised_{slot}", scan.renormalised)
    stats.add_count("captions_without_precomputed_vector", scan.left_out)
    provenance["renormalised"] = scan.renormalised
    provenance["captions_left_out"] = scan.left_out
    stats.add_time(f"read_{slot}", time.perf_counter() - started)
    log.info("%s: %d shard(s) read from %s; %d vectors renormalised; %d captions without a precomputed vector",
             model.requested_spec, len(shards), target.index_dir, scan.renormalised, scan.left_out)
