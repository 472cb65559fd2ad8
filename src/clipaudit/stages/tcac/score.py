"""Scoring the (image, transform) pairs left to do: the caption corpus and each image's caption pool (its own
captions and their nearest captions of the corpus), the originals' stored vectors, and the runner's transformed
vectors fed to the :class:`~clipaudit.stages.tcac.sink.CaseSink`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from clipaudit.batches.isolation import LOST_BEFORE
from clipaudit.batches.tcac import ORIGINAL
from clipaudit.records import StageStats
from clipaudit.stages.tcac.corpus import load_corpus
from clipaudit.stages.tcac.runner import Runner
from clipaudit.stages.tcac.sink import CaseSink
from clipaudit.stages.tcac.stored import load_originals
from clipaudit.tcac_scoring import caption_pools, first_rows

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.tcac")


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
