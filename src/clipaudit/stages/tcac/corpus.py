"""The caption corpus the tcac caption pools are drawn from: every unique caption of the samples with its CLIP text
vector, the stored ones reused and the missing ones encoded through the runner's text actor pool."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.batches.embed import OK
from clipaudit.batches.isolation import LOST_FLAG
from clipaudit.records import CAPTION_EMBEDDINGS, StageStats
from clipaudit.stages.tcac.runner import Runner
from clipaudit.stages.tcac.stored import stored_vectors
from clipaudit.tcac_scoring import CaptionCorpus, caption_key, caption_keys, corpus_of, first_rows

if TYPE_CHECKING:
    from clipaudit.config import EmbedConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.tcac")


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
    at, vectors = stored_vectors(tables, keys, model.spec)
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


def _encode(runner: Runner, texts: list[str], model: ResolvedModel, embed: EmbedConfig,
            stats: StageStats) -> dict[str, np.ndarray]:
    """Vectors of ``texts`` (captions missing in ``caption_embeddings``) by key, through the runner's text actor
    pool; texts whose forward failed are absent."""
    start = time.perf_counter()
    encoded: dict[str, np.ndarray] = {}
    for batch in runner.map_texts(pa.table({"text": pa.array(texts, pa.string())}), {"clip": model}, embed):
        if LOST_FLAG in batch:
            continue
        vectors = np.asarray(batch["vector_clip"], dtype=np.float32)
        for text, vector, status in zip(batch["text"], vectors, batch["status"]):
            if status == OK:
                encoded[caption_key(str(text))] = vector
    stats.add_time("infer_text", time.perf_counter() - start)
    return encoded
