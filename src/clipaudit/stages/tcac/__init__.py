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

The package: :mod:`~clipaudit.stages.tcac.plan` (the pairs left to do, checked against the settings of
:mod:`~clipaudit.stages.tcac.settings`), :mod:`~clipaudit.stages.tcac.corpus` (the caption corpus, reusing what
:mod:`~clipaudit.stages.tcac.stored` reads back), :mod:`~clipaudit.stages.tcac.score` (pools and the runner's
transformed vectors, through :mod:`~clipaudit.stages.tcac.runner`'s protocol) into
:mod:`~clipaudit.stages.tcac.sink` (scored rows, rejects), :mod:`~clipaudit.stages.tcac.marks` (cases marked, summary
recomputed), :mod:`~clipaudit.stages.tcac.summary` (accounting, the summary line); this module runs the stage.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from clipaudit.batches.isolation import reopen_retryable
from clipaudit.models.precomputed import is_precomputed
from clipaudit.records import SAMPLES, StageStats
from clipaudit.stages.reject_limit import check_reject_share
from clipaudit.stages.tcac.corpus import load_corpus
from clipaudit.stages.tcac.marks import CASE_COLUMNS, MARKS, REWRITE_ROWS, finalize, rewrite_cases
from clipaudit.stages.tcac.plan import STAGE, TcacError, plan_pairs
from clipaudit.stages.tcac.runner import Runner
from clipaudit.stages.tcac.score import score_missing
from clipaudit.stages.tcac.settings import input_settings, settings_for
from clipaudit.stages.tcac.sink import CaseSink
from clipaudit.stages.tcac.stored import load_originals
from clipaudit.stages.tcac.summary import account, summary_line
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.tcac")
__all__ = [
    "CASE_COLUMNS", "MARKS", "REWRITE_ROWS", "STAGE", "CaseSink", "Runner", "TcacError", "account", "finalize",
    "input_settings", "load_corpus", "load_originals", "plan_pairs", "resolve_clip", "rewrite_cases", "run_tcac",
    "score_missing", "settings_for", "summary_line",
]


def resolve_clip(config: Config) -> ResolvedModel:
    """The CLIP-role model of the config, resolved on the driver (weights checked, nothing loaded)."""
    from clipaudit.models import resolve_model

    m = config.models
    return resolve_model(m.clip, "clip", fallback=m.fallback, cache_dir=m.cache_dir)


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
