"""Embed stage: every sample's image under every model (each CLIP-role model and the reference), every caption
under each CLIP-role model's text tower.

``models`` maps a slot name to a resolved model: ``clip`` (and ``clip_2``, ``clip_3``, ... when ``models.clip`` is a
list) and ``reference`` (and ``reference_2``, ... when ``models.reference`` is a list). Each image is read and
decoded once, however many models there are; each model preprocesses it as it must. Rows carry the model's spec as
written in the config (``clip_model`` or ``reference_model``), which is part of their key: adding a model to a
list later embeds only that model. Vectors are variable-size lists (one table holds the models of a role, whose
dimensions may differ).

A CLIP-role model ``precomputed:INDEX_DIR`` (:mod:`clipaudit.models.precomputed`) is not sent through the runner:
its vectors are read from the clip-retrieval index (:func:`embed_precomputed`), before the other models run, so
the images it rejects are not embedded by them for nothing.

Plans what is left to do from the tables (so a re-run or a resumed run skips finished work), hands the batch
work to a runner (Ray or in-process) and is the single writer of the results: vectors into
``image_embeddings_clip`` / ``image_embeddings_reference`` / ``caption_embeddings``, unusable images and
captions whose forward failed into ``rejects`` (the batch functions never raise for one row: see
:mod:`clipaudit.batches.embed`). Writes go through :meth:`RunTables.insert_new`, keyed, so nothing is ever
written twice. The stage fails only when it rejected more than ``embed.max_reject_share`` of the images it tried
(:mod:`clipaudit.stages.reject_limit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from clipaudit.batches.embed import OK, Batch
from clipaudit.batches.isolation import LOST_BEFORE, LOST_FLAG, reopen_retryable
from clipaudit.models.precomputed import is_precomputed
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    CLIP_MODEL,
    REJECTS,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    SAMPLES,
    StageStats,
    caption_embeddings_schema,
    image_embeddings_schema,
    vector_array,
    with_clip_model,
)
from clipaudit.stages.embed.plan import (
    STAGE,
    EmbedError,
    column_ids,
    model_filter,
    plan_captions,
    plan_images,
    spec_column,
    table_of,
)
from clipaudit.stages.embed.precomputed import embed_precomputed
from clipaudit.stages.reject_limit import check_reject_share

if TYPE_CHECKING:
    from clipaudit.config import EmbedConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.embed")
__all__ = ["EmbedError", "embed_captions", "embed_images", "plan_images", "run_embed", "summary_line"]


class Runner(Protocol):
    """What the embed stage needs from a scheduler (see :mod:`clipaudit.runtime`)."""

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Yield prepared-and-embedded batches for ``todo``."""
        ...

    def map_texts(self, texts: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Yield batches of text vectors (columns ``text``, ``status``, ``detail`` and, for each model slot,
        ``vector_<slot>`` and ``t_infer_<slot>``) of the rows whose ``need_<slot>`` is set."""
        ...


class ImageSink:
    """Buffers embedded batches and writes them in few large, keyed writes; counts and times everything."""

    def __init__(self, tables: RunTables, models: dict[str, ResolvedModel], write_every: int,
                 stats: StageStats) -> None:
        self.tables, self.models, self.write_every, self.stats = tables, models, write_every, stats
        self.vectors: dict[str, list[pa.Table]] = {slot: [] for slot in models}
        self.rejects: list[dict[str, str]] = []
        self.buffered = 0

    def add(self, batch: Batch) -> int:
        """Take one output batch; returns how many images it held."""
        n = len(batch["image_id"])
        ok = batch["status"] == OK
        if LOST_FLAG in batch:
            self._reject(batch, np.flatnonzero(~ok))
            return n
        for phase in ("read", "decode"):
            self.stats.add_time(phase, float(np.sum(batch[f"t_{phase}"])))
        for slot, model in self.models.items():
            self.stats.add_time(f"infer_{slot}", float(np.sum(batch[f"t_infer_{slot}"])))
            rows = ok & batch[f"need_{slot}"].astype(bool)
            vectors = np.asarray(batch[f"vector_{slot}"][rows], dtype=np.float32)
            if len(vectors):
                self.vectors[slot].append(pa.table({
                    "image_id": pa.array(batch["image_id"][rows].tolist(), pa.string()),
                    "model": pa.array([model.spec] * len(vectors), pa.string()),
                    "vector": vector_array(vectors),
                    spec_column(model): pa.array([model.requested_spec] * len(vectors), pa.string()),
                }))
        self._reject(batch, np.flatnonzero(~ok))
        self.buffered += n
        if self.buffered >= self.write_every:
            self.flush()
        return n

    def _reject(self, batch: Batch, rows: np.ndarray) -> None:
        for i in rows:
            self.rejects.append({"source": str(batch["uri"][i]), "item": str(batch["image_id"][i]),
                                 "stage": STAGE, "reason": str(batch["status"][i]), "detail": str(batch["detail"][i])})

    def flush(self) -> None:
        """Write what is buffered: vectors per model, then rejects."""
        start = time.perf_counter()
        for slot, parts in self.vectors.items():
            if parts:
                model = self.models[slot]
                rows = pa.concat_tables(parts)
                column = spec_column(model)
                schema = image_embeddings_schema(None).append(pa.field(column, pa.string(), nullable=False))
                key = ["image_id", column]
                written = self.tables.insert_new(table_of(model), rows, key, schema)
                self.stats.add_count(f"embedded_{slot}", written)
                self.stats.notes.setdefault("embedded_by_model", {}).setdefault(model.requested_spec, 0)
                self.stats.notes["embedded_by_model"][model.requested_spec] += written
                parts.clear()
        if self.rejects:
            written = self.tables.insert_new(REJECTS, pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA),
                                             REJECTS_KEY, REJECTS_SCHEMA)
            self.stats.add_count("rejected", written)
            self.rejects.clear()
        self.buffered = 0
        self.stats.add_time("write", time.perf_counter() - start)


def _consume(batches: Iterable[Batch], add, flush, total: int, unit: str) -> None:
    with tqdm(total=total, unit=unit, desc=f"embed {unit}s", dynamic_ncols=True) as bar:
        for batch in batches:
            bar.update(add(batch))
    flush()


def embed_images(tables: RunTables, runner: Runner, models: dict[str, ResolvedModel], embed: EmbedConfig,
                 stats: StageStats, lost: set[str] | None = None) -> None:
    """Embed every sample image that some role still lacks; unusable images become rejects. Rows rejected by an
    earlier run for a transient reason (a worker lost) are tried again: ``lost`` holds them when the caller
    already reopened them (:func:`~clipaudit.batches.isolation.reopen_retryable`), None reopens them here."""
    if lost is None:
        lost = reopen_retryable(tables, STAGE)
        stats.add_count("retried", len(lost))
    todo = plan_images(tables, models)
    stats.add_count("images_todo", todo.num_rows)
    if todo.num_rows == 0:
        return
    todo = todo.append_column(LOST_BEFORE, pc.is_in(todo.column("image_id"), value_set=pa.array(sorted(lost),
                                                                                             pa.string())))
    sink = ImageSink(tables, models, embed.write_every, stats)
    _consume(_noting_first(runner.map_images(todo, models, embed), stats), sink.add, sink.flush, todo.num_rows,
             "image")


def _noting_first(batches: Iterator[Batch], stats: StageStats) -> Iterator[Batch]:
    """``batches``, noting in ``stats`` when the first came back (``first_image_at``, Unix time; on an autoscaling
    cluster, the moment the nodes the stage asked for were there and working)."""
    for n, batch in enumerate(batches):
        if n == 0:
            stats.notes["first_image_at"] = time.time()
        yield batch


class CaptionSink:
    """Turns one CLIP-role model's vectors of unique caption texts into rows for every caption with that text (each
    text is encoded once), and writes them in few large, keyed writes."""

    def __init__(self, tables: RunTables, todo: pa.Table, model: ResolvedModel, slot: str, write_every: int,
                 stats: StageStats) -> None:
        self.tables, self.todo, self.model, self.slot = tables, todo, model, slot
        self.write_every, self.stats = write_every, stats
        self.rows_of: dict[str, list[int]] = {}
        for row, text in enumerate(todo.column("text").to_pylist()):
            self.rows_of.setdefault(text, []).append(row)
        self.parts: list[pa.Table] = []
        self.rejects: list[dict[str, str]] = []
        self.buffered = 0

    def add(self, batch: Batch) -> None:
        """Take one batch of text vectors: the rows of this model's captions whose text is in it. A text whose
        forward failed (or whose worker was lost) becomes a ``rejects`` row for each caption with that text."""
        texts = [str(text) for text in batch["text"]]
        mine = [i for i, text in enumerate(texts) if text in self.rows_of]
        if LOST_FLAG in batch:
            for i in mine:
                self._reject(texts[i], str(batch["status"][i]), str(batch["detail"][i]))
            return
        self.stats.add_time("infer_text", float(np.sum(batch[f"t_infer_{self.slot}"])))
        vectors = np.asarray(batch[f"vector_{self.slot}"], dtype=np.float32)
        rows, sources = [], []
        for i in mine:
            if batch["status"][i] != OK:
                self._reject(texts[i], str(batch["status"][i]), str(batch["detail"][i]))
                continue
            for row in self.rows_of[texts[i]]:
                rows.append(row)
                sources.append(i)
        self.parts.append(self.todo.take(rows).append_column(
            "model", pa.array([self.model.spec] * len(rows), pa.string())).append_column(
            "vector", vector_array(vectors[sources].reshape(len(rows), vectors.shape[1]))).append_column(
            CLIP_MODEL, pa.array([self.model.requested_spec] * len(rows), pa.string())))
        self.buffered += len(rows)
        self.stats.add_count("text_encodings", len(set(sources)))
        if self.buffered >= self.write_every:
            self.flush()

    def _reject(self, text: str, reason: str, detail: str) -> None:
        """A ``rejects`` row for each caption with ``text``."""
        for row in self.rows_of[text]:
            self.rejects.append({"source": self.todo.column("image_id")[row].as_py(),
                                 "item": self.todo.column("caption_id")[row].as_py(), "stage": STAGE,
                                 "reason": reason, "detail": detail})

    def flush(self) -> None:
        """Write what is buffered: caption vectors, then the captions rejected."""
        start = time.perf_counter()
        if self.parts:
            rows = pa.concat_tables(self.parts)
            schema = with_clip_model(caption_embeddings_schema(None))
            written = self.tables.insert_new(CAPTION_EMBEDDINGS, rows, ["caption_id", CLIP_MODEL], schema)
            self.stats.add_count("embedded_captions", written)
            by_model = self.stats.notes.setdefault("embedded_captions_by_model", {})
            by_model[self.model.requested_spec] = by_model.get(self.model.requested_spec, 0) + written
            self.parts.clear()
        if self.rejects:
            written = self.tables.insert_new(REJECTS, pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA),
                                             REJECTS_KEY, REJECTS_SCHEMA)
            self.stats.add_count("rejected_captions", written)
            self.rejects.clear()
        self.buffered = 0
        self.stats.add_time("write", time.perf_counter() - start)


def caption_texts(sinks: list[CaptionSink]) -> pa.Table:
    """The distinct texts the ``sinks`` lack, each once (in the order first needed), with ``need_<slot>`` for each
    sink's model."""
    texts = list(dict.fromkeys(text for sink in sinks for text in sink.rows_of))
    columns = {"text": pa.array(texts, pa.string())}
    for sink in sinks:
        columns[f"need_{sink.slot}"] = pa.array([text in sink.rows_of for text in texts], pa.bool_())
    return pa.table(columns)


def embed_captions(tables: RunTables, runner: Runner, models: dict[str, ResolvedModel], embed: EmbedConfig,
                   stats: StageStats) -> None:
    """Embed every caption that has no vector yet of a CLIP-role model of ``models`` (slot -> model) with that
    model's text tower: one pass over the distinct texts, in which each model encodes the texts it lacks."""
    sinks = []
    for slot, model in models.items():
        todo = plan_captions(tables, model)
        stats.add_count("captions_todo", todo.num_rows)
        if todo.num_rows:
            sinks.append(CaptionSink(tables, todo, model, slot, embed.write_every, stats))
    if not sinks:
        return

    def add(batch: Batch) -> int:
        for sink in sinks:
            sink.add(batch)
        return len(batch["text"])

    def flush() -> None:
        for sink in sinks:
            sink.flush()

    texts = caption_texts(sinks)
    _consume(runner.map_texts(texts, {sink.slot: sink.model for sink in sinks}, embed), add, flush, texts.num_rows,
             "caption text")


def account(tables: RunTables, models: Iterable[ResolvedModel]) -> dict[str, int]:
    """Corpus-level accounting: samples in, images embedded by every model, images rejected by this stage, caption
    vectors, captions rejected by this stage."""
    samples = set(column_ids(tables.read(SAMPLES, ["image_id"])).to_pylist())
    embedded = set(samples)
    for model in models:
        name = table_of(model)
        rows = tables.read(name, ["image_id"], where=model_filter(tables, name, model))
        embedded &= set(column_ids(rows).to_pylist())
    items = set(column_ids(tables.read(REJECTS, ["item"], where=f"stage = '{STAGE}'"), "item").to_pylist())
    rejected = items & samples
    return {"in": len(samples), "embedded": len(embedded), "rejected": len(rejected),
            "captions": tables.count(CAPTION_EMBEDDINGS), "rejected_captions": len(items - samples)}


def check_rejects(tables: RunTables, totals: dict[str, int], limit: float) -> None:
    """Fail the stage (:class:`~clipaudit.stages.reject_limit.RejectLimitError`) when more than ``limit`` of the
    images it tried (embedded or rejected by it) were rejected; the message names the top reasons."""
    if not totals["rejected"] or totals["rejected"] / max(totals["embedded"] + totals["rejected"], 1) <= limit:
        return
    samples = column_ids(tables.read(SAMPLES, ["image_id"]))
    rejects = tables.read(REJECTS, ["item", "reason", "detail"], where=f"stage = '{STAGE}'")
    rejects = rejects.filter(pc.is_in(rejects.column("item"), value_set=samples)).sort_by("item")
    check_reject_share(STAGE, totals["embedded"] + totals["rejected"], rejects.to_pylist(), limit, "images")


def run_embed(tables: RunTables, runner: Runner, models: dict[str, ResolvedModel], embed: EmbedConfig) -> StageStats:
    """Run the embed stage: the vectors of precomputed models read from their index, then images under every other
    model of ``models`` (slot -> model; one decode per image), then captions under the text tower of each computed
    CLIP-role model (one pass over the distinct texts)."""
    stats = StageStats(STAGE)
    started = time.perf_counter()
    lost = reopen_retryable(tables, STAGE)
    stats.add_count("retried", len(lost))
    computed = {slot: model for slot, model in models.items() if not is_precomputed(model)}
    for slot, model in models.items():
        if is_precomputed(model):
            embed_precomputed(tables, slot, model, embed, stats)
    if computed:
        embed_images(tables, runner, computed, embed, stats, lost)
    clip_models = {slot: model for slot, model in computed.items() if model.role == "clip"}
    if clip_models:
        embed_captions(tables, runner, clip_models, embed, stats)
    totals = account(tables, models.values())
    stats.counts.update({f"total_{k}": v for k, v in totals.items()})
    stats.add_time("wall", time.perf_counter() - started)
    stats.notes.update(models={slot: m.spec for slot, m in models.items()},
                       clip_models=[m.requested_spec for m in models.values() if m.role == "clip"],
                       random_models=any(m.is_random for m in models.values()),
                       device=getattr(runner, "device", "cpu"))
    check_rejects(tables, totals, embed.max_reject_share)
    return stats


def summary_line(stats: StageStats) -> str:
    """``N in = E embedded + R rejected`` plus what this run did."""
    c = stats.counts
    line = f"{c['total_in']} in = {c['total_embedded']} embedded + {c['total_rejected']} rejected"
    if c.get("total_rejected_captions"):
        line += f" ({c['total_rejected_captions']} captions rejected)"
    new_images = sum(v for k, v in c.items() if k.startswith("embedded_") and k != "embedded_captions")
    if c.get("captions_without_precomputed_vector"):
        line += f"; {c['captions_without_precomputed_vector']} captions have no precomputed vector (left out)"
    if all(c.get(key, 0) == 0 for key in ("images_todo", "captions_todo", "precomputed_images_todo",
                                          "embedded_captions")):
        return f"{line}; {c['total_captions']} captions embedded; nothing left to do, no new rows written"
    return (f"{line}; {c['total_captions']} captions embedded; this run wrote {new_images} image vectors, "
            f"{c.get('embedded_captions', 0)} caption vectors, {c.get('rejected', 0)} rejects")
