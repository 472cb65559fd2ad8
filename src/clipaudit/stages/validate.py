"""Validate stage (beyond the paper, MultiMon style): does CLIP really have each failure type? ->
``failure_checks``.

For every row of ``failure_types`` the LLM writes ``validate.pairs_per_type`` pairs of captions that exhibit the
type: two captions of visibly different images that differ only in what the type is about (template
``clipaudit/llm/prompts/validate.txt``, replaceable by ``llm.validate_template``). CLIP's text tower (the
``models.clip`` spec, ``models.fallback`` honoured) embeds both captions of every pair; a pair CLIP encodes as
near-identical (cosine similarity at or above the threshold) is a success: the failure reproduces. The success
rate of a type is the share of its pairs that succeed.

The threshold: ``validate.threshold_mode: absolute`` uses ``validate.threshold`` (0.9 by default).
``corpus_quantile`` uses the ``validate.corpus_quantile`` quantile of the similarities of random pairs of corpus
captions from different images (``caption_embeddings``, same CLIP model): CLIP text similarities sit in a
model-specific band (unrelated captions are rarely near 0), so "near-identical" is better read against what the
same model gives unrelated captions of the same corpus: at the default 0.99, a success is a pair CLIP finds as
similar as the most similar 1 % of unrelated caption pairs.

Requests go through the same machinery as summarize (recorded in ``llm_calls``, cached, estimate printed,
``llm.dry_run`` honoured); the table is recomputed and replaced on every run. A caption the text tower cannot take
(its forward raises alone, or gives NaN) drops its pair, not the stage: the forward is split in halves down to the
failing captions (:func:`clipaudit.batches.isolation.run_isolated`), the pair is left out of ``pairs`` and
counted as ``pairs_rejected``, and the first such error is logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipaudit.batches.isolation import describe, run_isolated
from clipaudit.errors import ClipauditError
from clipaudit.io import failure_types
from clipaudit.llm.parse import ParseError, _candidates, _load
from clipaudit.llm.prompts import PAIRS_FORMAT, load_template, request_params
from clipaudit.llm.requests import LLMRequest
from clipaudit.models.precomputed import PREFIX as PRECOMPUTED
from clipaudit.records import CAPTION_EMBEDDINGS, FAILURE_CHECKS, FAILURE_CHECKS_SCHEMA, FAILURE_TYPES, StageStats
from clipaudit.runtime.llm_session import LLMSession, PlannedCall
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.validate")
STAGE = "validate"
PAIR_KEYS = (("a", "b"), ("caption_a", "caption_b"), ("first", "second"), ("caption1", "caption2"))


class ValidateError(ClipauditError, RuntimeError):
    """The validate stage cannot run (the message says why and what to do)."""


@dataclass(frozen=True)
class FailureType:
    """One row of ``failure_types`` to check."""

    name: str
    description: str
    method: str


def _pair_of(item: Any) -> tuple[str, str] | None:
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0].strip(), item[1].strip()
    if isinstance(item, dict):
        lowered = {str(k).strip().lower(): v for k, v in item.items()}
        for a, b in PAIR_KEYS:
            if isinstance(lowered.get(a), str) and isinstance(lowered.get(b), str):
                return lowered[a].strip(), lowered[b].strip()
        strings = [v for v in item.values() if isinstance(v, str)]
        if len(item) == 2 and len(strings) == 2:
            return strings[0].strip(), strings[1].strip()
    return None


def parse_pairs(answer: str) -> list[tuple[str, str]]:
    """Read the caption pairs of an answer; :class:`~clipaudit.llm.parse.ParseError` when there are none.

    Accepts ``{"pairs": [{"a": ..., "b": ...}]}``, ``{"pairs": [[a, b]]}`` or the bare list, as JSON or a Python
    literal (never evaluated), fenced or inside prose. Pairs with an empty caption or two equal captions (equal
    texts prove nothing) are dropped.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ParseError("empty answer")
    for candidate in _candidates(answer.strip()):
        value = _load(candidate)
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if not isinstance(value, list):
            continue
        pairs = [p for p in (_pair_of(item) for item in value)
                 if p is not None and p[0] and p[1] and p[0].lower() != p[1].lower()]
        if pairs:
            return list(dict.fromkeys(pairs))
    raise ParseError("no caption pairs in the answer")


def load_types(config: Config, tables: RunTables) -> list[FailureType]:
    """The LLM's failure types to check, by method then rank (at most ``validate.max_types`` per method)."""
    found = failure_types.read_rows(tables, failure_types.LLM)
    if found is None:
        raise ValidateError(empty_input_message(tables, f"no {FAILURE_TYPES} table in {tables.uri}", "summarize",
                                                FAILURE_TYPES))
    rows = sorted(found, key=lambda r: (str(r["method"]), r.get("rank") or 0, str(r["name"])))
    limit = config.validate.max_types
    taken: dict[str, int] = {}
    types = []
    for row in rows:
        method = str(row["method"])
        if limit is not None and taken.get(method, 0) >= limit:
            continue
        taken[method] = taken.get(method, 0) + 1
        types.append(FailureType(str(row["name"]), str(row.get("description") or ""), method))
    return types


def plan_calls(config: Config, types: Sequence[FailureType]) -> list[PlannedCall]:
    """One request per failure type, its name and description as the data block."""
    llm = config.llm
    template = load_template("validate", llm.validate_template)
    params = request_params(llm.temperature, llm.max_tokens, PAIRS_FORMAT if llm.structured_output else None)
    calls = []
    for t in types:
        text = template.render({"name": t.name, "description": t.description},
                               n_pairs=config.validate.pairs_per_type)
        request = LLMRequest(llm.model, [{"role": "user", "content": text}], params)
        calls.append(PlannedCall(request, STAGE, t.method, {"failure_type": t.name, "method": t.method}))
    return calls


def resolve_clip(config: Config) -> ResolvedModel:
    """The CLIP-role model of the config (``models.fallback`` honoured), resolved on the driver."""
    from clipaudit.models import resolve_model

    m = config.models
    return resolve_model(m.clip, "clip", fallback=m.fallback, cache_dir=m.cache_dir)


def pair_similarities(texts_a: Sequence[str], texts_b: Sequence[str],
                      encode: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, dict[int, str]]:
    """Cosine similarity of each pair under ``encode`` (texts -> rows), one forward over all texts, and the pairs
    left without one: pair index -> the reject detail of its first caption whose forward failed alone (raised, or
    gave NaN; its similarity is NaN)."""
    if not texts_a:
        return np.zeros(0, dtype=np.float32), {}
    texts = list(texts_a) + list(texts_b)

    def forward(part: np.ndarray) -> np.ndarray:
        vectors = np.asarray(encode([texts[i] for i in part]), dtype=np.float32)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            raise FloatingPointError(f"the text tower returned NaN, infinite or misshapen values {vectors.shape}")
        return vectors

    found = run_isolated(forward, len(texts))
    dim = next((len(v) for v in found.results if v is not None), 1)
    vectors = np.stack([v if v is not None else np.full(dim, np.nan, np.float32) for v in found.results])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    n = len(texts_a)
    errors: dict[int, str] = {}
    for position, exc in sorted(found.errors.items()):
        errors.setdefault(position % n, describe(exc, f"text forward of {texts[position]!r}"))
    return np.einsum("ij,ij->i", vectors[:n], vectors[n:]), errors


def corpus_threshold(tables: RunTables, spec: str, quantile: float, pairs: int, seed: int) -> float:
    """The ``quantile`` of the cosine similarities of ``pairs`` random caption pairs of different images, from
    ``caption_embeddings`` (whose vectors must come from ``spec``); seeded."""
    if not tables.exists(CAPTION_EMBEDDINGS):
        missing = f"validate.threshold_mode corpus_quantile needs {CAPTION_EMBEDDINGS} in {tables.uri}"
        raise ValidateError(empty_input_message(tables, missing, "embed", CAPTION_EMBEDDINGS)
                            + " (or use validate.threshold_mode absolute)")
    dataset = tables.db.open_table(CAPTION_EMBEDDINGS).to_lance()
    mine = tables.positions(CAPTION_EMBEDDINGS)
    n = dataset.count_rows() if mine is None else len(mine)
    if n < 2:
        raise ValidateError(f"{CAPTION_EMBEDDINGS} holds {n} captions: too few for validate.corpus_quantile")
    rng = np.random.default_rng(seed)
    left, right = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    rows = np.unique(np.concatenate([left, right]))
    sample = dataset.take((rows if mine is None else mine[rows]).tolist(), columns=["image_id", "model", "vector"])
    models = set(sample.column("model").to_pylist())
    if models != {spec}:
        raise ValidateError(f"{CAPTION_EMBEDDINGS} holds vectors of {sorted(models)}, but validate embeds with "
                            f"{spec!r}: use threshold_mode absolute, or the same models.clip as the embed stage")
    position = {int(r): i for i, r in enumerate(rows)}
    vectors = np.asarray(sample.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(rows), -1)
    image_ids = np.asarray(sample.column("image_id").to_pylist(), dtype=object)
    li = np.array([position[int(r)] for r in left])
    ri = np.array([position[int(r)] for r in right])
    keep = image_ids[li] != image_ids[ri]
    if not keep.any():
        raise ValidateError(f"{CAPTION_EMBEDDINGS}: no caption pairs of different images to compare")
    sims = np.einsum("ij,ij->i", vectors[li[keep]], vectors[ri[keep]])
    return float(np.quantile(sims, quantile))


def checks_table(types: Sequence[FailureType], calls: Sequence[PlannedCall], statuses: dict[str, str],
                 sims_of: dict[str, np.ndarray], pairs_of: dict[str, list[tuple[str, str]]], threshold: float,
                 mode: str, model: str) -> pa.Table:
    """``failure_checks`` rows, one per failure type, in the order of ``types``."""
    rows = []
    for t, call in zip(types, calls, strict=True):
        rid = call.request.request_id
        pairs = pairs_of.get(rid, [])
        sims = sims_of.get(rid, np.zeros(0, dtype=np.float32))
        rows.append({
            "name": t.name, "method": t.method, "description": t.description,
            "pairs": json.dumps([list(p) for p in pairs], ensure_ascii=False), "n_pairs": len(pairs),
            "sims": [float(s) for s in sims],
            "success_rate": float(np.mean(sims >= threshold)) if len(sims) else None,
            "mean_sim": float(np.mean(sims)) if len(sims) else None,
            "threshold": threshold, "threshold_mode": mode, "model": model, "request_id": rid,
            "status": statuses.get(rid, "pending"),
        })
    return pa.Table.from_pylist(rows, schema=FAILURE_CHECKS_SCHEMA)


def run_validate(config: Config, tables: RunTables, runner: object | None = None) -> StageStats:
    """Run the validate stage (see the module docstring)."""
    tables = model_view(tables, config)
    stats = StageStats(STAGE)
    started = time.perf_counter()
    if config.llm.dry_run and not failure_types.read_rows(tables, failure_types.LLM):
        log.info("validate: no failure types yet (the summarize stage ran as a dry run): nothing to validate")
        stats.notes["summary"] = "no failure types yet: nothing planned, nothing sent"
        return stats
    if config.models.clip.startswith(PRECOMPUTED):
        reason = (f"{config.models.clip}: its vectors are precomputed, with no text tower to encode the new caption "
                  "pairs; name the model the index was built with to validate")
        log.warning("validate: skipped: %s", reason)
        stats.notes.update(skipped=reason, summary="validate: skipped (precomputed CLIP vectors: no text tower)")
        return stats
    types = load_types(config, tables)
    calls = plan_calls(config, types)
    stats.add_count("failure_types", len(types))
    with LLMSession(config, tables, runner, STAGE, stats) as session:
        answers = session.send(calls, parse_pairs, label=STAGE)
        if session.dry_run:
            stats.notes["summary"] = f"{len(calls)} validate requests planned; nothing sent, no table written"
            stats.add_time("wall", time.perf_counter() - started)
            return stats
        statuses = {rid: row["status"] for rid, row in session.calls.rows(c.request.request_id for c in calls).items()}
    cfg = config.validate
    pairs_of: dict[str, list[tuple[str, str]]] = {}
    for call in calls:
        text = answers.get(call.request.request_id)
        if text is not None:
            try:
                pairs_of[call.request.request_id] = parse_pairs(text)[: cfg.pairs_per_type]
            except ParseError as exc:
                log.warning("answer %s does not parse any more (%s); skipped", call.request.request_id, exc)
    model_spec = config.models.clip
    threshold = cfg.threshold
    sims_of: dict[str, np.ndarray] = {}
    if pairs_of:
        resolved = resolve_clip(config)
        model_spec = resolved.spec
        if resolved.is_random:
            log.warning("validate embeds with %s, a RANDOM model: its success rates are meaningless", resolved.spec)
        if cfg.threshold_mode == "corpus_quantile":
            threshold = corpus_threshold(tables, resolved.spec, cfg.corpus_quantile, cfg.corpus_pairs, cfg.seed)
            log.info("near-identical threshold: %.4f (the %.3g quantile of corpus caption pairs)", threshold,
                     cfg.corpus_quantile)
        t0 = time.perf_counter()
        encoder = resolved.load("cpu")
        order = list(pairs_of)
        flat = [p for rid in order for p in pairs_of[rid]]
        sims, errors = pair_similarities([a for a, _ in flat], [b for _, b in flat], encoder.encode_texts)
        if errors:
            log.warning("validate: %d caption pairs left out, their captions could not be embedded; first: %s",
                        len(errors), errors[min(errors)])
        stats.add_count("pairs_rejected", len(errors))
        offset = 0
        for rid in order:
            count = len(pairs_of[rid])
            keep = [j for j in range(count) if offset + j not in errors]
            sims_of[rid] = sims[offset : offset + count][keep]
            pairs_of[rid] = [pairs_of[rid][j] for j in keep]
            offset += count
        stats.add_time("embed", time.perf_counter() - t0)
    table = checks_table(types, calls, statuses, sims_of, pairs_of, threshold, cfg.threshold_mode,
                         model_spec)
    tables.replace(FAILURE_CHECKS, table, FAILURE_CHECKS_SCHEMA)
    checked = sum(1 for rid in pairs_of if len(pairs_of[rid]))
    stats.counts.update({"checked": checked, "pairs": sum(len(p) for p in pairs_of.values()),
                         "unanswered": len(calls) - len(answers)})
    stats.notes.update(threshold=threshold, threshold_mode=cfg.threshold_mode, model=model_spec)
    rates = [r for r in table.column("success_rate").to_pylist() if r is not None]
    mean_rate = sum(rates) / len(rates) if rates else float("nan")
    stats.notes["summary"] = (f"validate: {checked} of {len(types)} failure types checked with "
                              f"{stats.counts['pairs']} caption pairs; mean success rate {mean_rate:.2f} "
                              f"at cosine >= {threshold:.3f}")
    if stats.counts.get("pairs_rejected"):
        stats.notes["summary"] += f"; {stats.counts['pairs_rejected']} pairs left out (a caption failed to embed)"
    log.info("%s", stats.notes["summary"])
    stats.add_time("wall", time.perf_counter() - started)
    return stats
