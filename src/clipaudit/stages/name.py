"""Name stage: failure types named offline, at no cost, from the captions of the pairs DAF flagged.

The caption-contrast namer (:mod:`clipaudit.caption_contrast`) compares the words that differ between the two
captions of each flagged pair (every CLIP-blind pair, strongest gap first; every DAF case with each of its
CLIP-only neighbours, in case rank order; each unordered pair once) with the words that differ between
background pairs: half pairs of images the reference model finds near (its neighbour lists, when the neighbours
table has them), half seeded random pairs of the corpus (:func:`clipaudit.caption_contrast.background_pairs`),
and groups the separating terms into failure types. They go to ``failure_types`` with ``namer =
caption_contrast`` and ``method = DAF`` (the LLM's rows, from the summarize stage, stay), each with its terms,
support, example images and evidence pairs. It runs with every audit, with or without an LLM.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipaudit import caption_contrast as cc
from clipaudit.errors import ClipauditError
from clipaudit.io import failure_types
from clipaudit.records import BLIND_PAIRS, DAF_CASES, FAILURE_TYPES_SCHEMA, NEIGHBOURS, SAMPLES, StageStats
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config, NameConfig
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.name")

STAGE = "name"
NAMER = "caption_contrast"
METHOD = "DAF"


class NamingError(ClipauditError):
    """The name stage cannot run (its input is missing)."""


def flagged_pairs(tables: Any) -> list[tuple[str, str]]:
    """The pairs to explain: CLIP-blind pairs by gap (largest first), then (case, CLIP-only neighbour) pairs by
    case rank; a pair already listed (either way round) is not listed again."""
    pairs: list[tuple[str, str]] = []
    blind = tables.read(BLIND_PAIRS, ["image_a", "image_b", "gap"]) if tables.exists(BLIND_PAIRS) else None
    if blind is not None:
        rows = sorted(blind.to_pylist(), key=lambda r: (-(r["gap"] or 0.0), r["image_a"], r["image_b"]))
        pairs += [(r["image_a"], r["image_b"]) for r in rows]
    cases = tables.read(DAF_CASES, ["image_id", "rank", "clip_only"])
    for row in sorted(cases.to_pylist(), key=lambda r: (r["rank"] is None, r["rank"] or 0, r["image_id"])):
        pairs += [(row["image_id"], other) for other in row["clip_only"] or []]
    seen: set[frozenset[str]] = set()
    unique = []
    for a, b in pairs:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            unique.append((a, b))
    return unique


def reference_pairs(tables: Any, index: dict[str, int], rows: int, seed: int) -> list[tuple[int, int]]:
    """(image, reference neighbour) pairs as indices of ``index``, from every reference's lists in ``neighbours``
    ([] without the table or its reference rows); from a seeded sample of at most ``rows`` lists, so a corpus of
    millions is not expanded into Python for the few thousand background pairs it needs."""
    if not tables.exists(NEIGHBOURS):
        return []
    table = tables.read(NEIGHBOURS, ["image_id", "ids"], where="model = 'reference'")
    if table is None:
        return []
    if table.num_rows > rows:
        picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
        table = table.take(pa.array(picked))
    out = []
    for image_id, ids in zip(table.column("image_id").to_pylist(), table.column("ids").to_pylist()):
        a = index.get(image_id)
        if a is not None:
            out += [(a, index[other]) for other in ids or [] if other in index]
    return out


def _pct(share: float) -> str:
    """A share as a percentage, with a decimal below 10 % (``37%``, ``0.4%``)."""
    return f"{share:.0%}" if share >= 0.1 or share == 0 else f"{share:.1%}"


def term_share(documents: list[frozenset[str]], grams: set[str]) -> float:
    """The share of the n-grams of ``documents`` (what differs between two captions) that are in ``grams``."""
    total = sum(len(doc) for doc in documents)
    return sum(len(doc & grams) for doc in documents) / total if total else 0.0


def failure_rows(types: list[cc.FailureType], pairs: list[tuple[str, str]], foreground: list[frozenset[str]],
                 background: list[frozenset[str]], cfg: NameConfig) -> pa.Table:
    """``failure_types`` rows of the strongest ``cfg.max_types`` types."""
    rows = []
    for rank, failure in enumerate(types[: cfg.max_types], start=1):
        grams = {term.ngram for term in failure.terms}
        shown = [pairs[i] for i in failure.documents]
        fg_share, bg_share = term_share(foreground, grams), term_share(background, grams)
        ratio = f", {fg_share / bg_share:.1f} \u00d7" if bg_share else ""
        subject = f"{failure.family} words" if failure.family else "These words"
        description = (f"{subject[0].upper()}{subject[1:]} ({', '.join(failure.top_words(5))}) make up "
                       f"{_pct(fg_share)} of the words that tell the two captions of a flagged pair apart, against "
                       f"{_pct(bg_share)} between other pairs of the corpus{ratio}; they tell apart "
                       f"{len(failure.documents):,} of the {len(pairs):,} flagged pairs. CLIP conflates images "
                       "that these words tell apart.")
        examples = list(dict.fromkeys(image for pair in shown for image in pair))[: 2 * cfg.evidence]
        rows.append({"name": failure.name, "description": description, "method": METHOD,
                     "support": len(failure.documents), "batches": None, "example_ids": examples, "aliases": [],
                     "rank": rank, "merge": None, "model": NAMER, "request_ids": [],
                     "terms": [t.ngram for t in sorted(failure.terms, key=lambda t: -t.z)][:20],
                     "evidence_pairs": [f"{a}|{b}" for a, b in shown[: cfg.evidence]]})
    return pa.Table.from_pylist(rows, schema=FAILURE_TYPES_SCHEMA)


def run_name(config: Config, tables: RunTables) -> StageStats:
    """Run the name stage (see the module docstring)."""
    tables = model_view(tables, config)
    cfg = config.name
    stats = StageStats(STAGE)
    started = time.perf_counter()
    if not tables.exists(DAF_CASES):
        raise NamingError(empty_input_message(tables, f"no {DAF_CASES} table in {tables.uri}", "daf", DAF_CASES))
    pairs = flagged_pairs(tables)
    samples = tables.read(SAMPLES, ["image_id", "caption"])
    captions = dict(zip(samples.column("image_id").to_pylist(), samples.column("caption").to_pylist()))
    pairs = [(a, b) for a, b in pairs if captions.get(a) is not None and captions.get(b) is not None]
    ids = sorted(captions)
    index = {image_id: i for i, image_id in enumerate(ids)}
    flagged = {frozenset((index[a], index[b])) for a, b in pairs}
    near = [pair for pair in reference_pairs(tables, index, cfg.background_pairs, cfg.seed)
            if frozenset(pair) not in flagged]
    chosen, n_near = (cc.background_pairs(len(ids), near, max(cfg.background_pairs, len(pairs)), cfg.seed)
                      if pairs else ([], 0))
    foreground = [cc.difference(captions[a], captions[b], cfg.ngram_max) for a, b in pairs]
    background = [cc.difference(captions[ids[a]], captions[ids[b]], cfg.ngram_max) for a, b in chosen]
    types = cc.name_failures(foreground, background, min_z=cfg.min_z, min_count=cfg.min_count, alpha0=cfg.alpha0)
    table = failure_rows(types, pairs, foreground, background, cfg)
    failure_types.replace_rows(tables, table, NAMER)
    stats.counts.update({"flagged_pairs": len(pairs), "background_pairs": len(background),
                         "background_reference_pairs": n_near, "failure_types": table.num_rows})
    if not pairs:
        stats.notes["summary"] = "name: no flagged pairs (no CLIP-blind pair, no DAF case): no failure type"
    else:
        top = f"; top: {table.column('name')[0].as_py()}" if table.num_rows else ""
        stats.notes["summary"] = (f"name: {table.num_rows} failure types from the captions of {len(pairs):,} "
                                  f"flagged pairs against {len(background):,} other pairs ({n_near:,} "
                                  f"reference neighbours, {len(background) - n_near:,} random){top}")
    log.info("%s", stats.notes["summary"])
    stats.add_time("wall", time.perf_counter() - started)
    return stats
