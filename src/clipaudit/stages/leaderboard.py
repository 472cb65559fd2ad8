"""Leaderboard stage: how blind each CLIP-role model of the run is, on the same images and by the same measures
-> ``leaderboard`` (one row per model of ``models.clip``).

Every measure is read from the per-model rows the other stages wrote (through each model's view of the tables,
:class:`~clipaudit.io.tables.ModelTables`), so the models are compared on exactly the same images, the same
reference lists and the same transformed pixels:

* ``mean_overlap``: the mean overlap@k of the model's neighbour lists with the reference's (the DAF's alignment;
  higher is better), with ``chance_overlap`` (k / (N - 1)) and ``overlap_p_value`` (the permutation null: the
  chance that unrelated lists agree as much) beside it; with several references, the mean over them and the
  largest p-value;
* ``blind_pairs`` (the model's CLIP-blind pairs) and ``blind_pair_rate`` (per image);
* ``daf_cases``: how many images the DAF picked as failure cases;
* per transform ``t``: ``top1_flip_rate_<t>`` (share of images whose top caption changed),
  ``recall_at_1_before_<t>`` / ``recall_at_1_after_<t>`` (share whose own caption ranked first);
* ``failure_types`` (named by the LLM, both methods), ``contrast_types`` (named offline by the name stage) and
  ``validation_success_rate`` (mean over the types checked: how often the text tower could not tell the LLM's
  caption pairs apart);
* ``blindness``: the documented score the ``rank`` orders by (1 = most blind):
  ``blindness = ((1 - mean_overlap) + min(1, blind_pair_rate)) / 2``, the two DAF measures, for which the
  reference model is the yardstick. The TCAC and validation columns measure other things (robustness to
  transforms, the text tower) and stay beside it for a user to re-rank by.

Beside the measures, what each model ran with, from ``run_dir/models.json`` (:mod:`clipaudit.run_models`):
``model_ran`` (the spec that ran: another one after a fallback), ``weights_sha256`` and ``revision`` (the Hugging
Face snapshot), null where the run recorded nothing.

A measure whose stage has not run for a model is null. The table is recomputed and replaced on every run, with one
row per model of the run's ``models.clip``: a model taken off the list loses its row (its other rows stay in the
tables).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.io import failure_types
from clipaudit.records import (
    BLIND_PAIRS,
    CLIP_MODEL,
    DAF_CASES,
    FAILURE_CHECKS,
    LEADERBOARD,
    NEIGHBOURS,
    TCAC_SUMMARY,
    StageStats,
)
from clipaudit.run_models import read_models
from clipaudit.transforms.severities import parse_graded

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import ModelTables, RunTables

log = logging.getLogger("clipaudit.leaderboard")
STAGE = "leaderboard"

TRANSFORM_MEASURES = {"top1_flip_rate": "top1_changed_share", "recall_at_1_before": "recall_at_1_before",
                      "recall_at_1_after": "recall_at_1_after"}
"""Leaderboard column prefix -> the ``tcac_summary`` column it copies, one column per transform."""


def leaderboard_schema(transforms: list[str]) -> pa.Schema:
    """The ``leaderboard`` schema for the configured transforms."""
    fields = [
        pa.field("rank", pa.int32()),
        pa.field(CLIP_MODEL, pa.string(), nullable=False),
        pa.field("model_ran", pa.string()),
        pa.field("weights_sha256", pa.string()),
        pa.field("revision", pa.string()),
        pa.field("blindness", pa.float64()),
        pa.field("images", pa.int64()),
        pa.field("k", pa.int32()),
        pa.field("mean_overlap", pa.float64()),
        pa.field("chance_overlap", pa.float64()),
        pa.field("overlap_p_value", pa.float64()),
        pa.field("daf_cases", pa.int64()),
        pa.field("blind_pairs", pa.int64()),
        pa.field("blind_pair_rate", pa.float64()),
    ]
    fields += [pa.field(f"{prefix}_{t}", pa.float64()) for t in transforms for prefix in TRANSFORM_MEASURES]
    fields += [pa.field("failure_types", pa.int64()), pa.field("contrast_types", pa.int64()),
               pa.field("validation_success_rate", pa.float64())]
    return pa.schema(fields)


def blindness(mean_overlap: float | None, blind_pair_rate: float | None) -> float | None:
    """The ranking score: ``((1 - mean_overlap) + min(1, blind_pair_rate)) / 2``; None without neighbours."""
    if mean_overlap is None:
        return None
    return ((1.0 - mean_overlap) + min(1.0, blind_pair_rate or 0.0)) / 2.0


def alignment(view: ModelTables, config: Config) -> dict[str, Any]:
    """``images``, ``k``, ``mean_overlap``, ``chance_overlap`` and ``overlap_p_value`` of one model against the
    reference (the DAF's own computation over the model's neighbour lists); empty without lists."""
    from clipaudit.stages.daf import DafError, corpus_figures, load_lists, score_images

    if view.count(NEIGHBOURS) == 0:
        return {}
    try:
        lists = load_lists(view, config.models.reference_models)
    except DafError as exc:
        log.warning("leaderboard: no usable neighbour lists for %s (%s)", view.clip_model, exc)
        return {}
    figures = [corpus_figures(one, score_images(one, config.daf), config.daf) for one in lists.per_reference()]
    p_values = [f["null"].get("corpus_p_value") for f in figures]
    p_values = [p for p in p_values if p is not None and not np.isnan(p)]
    return {"images": lists.n, "k": lists.k, "mean_overlap": float(np.mean([f["mean_overlap"] for f in figures])),
            "chance_overlap": figures[0]["chance_overlap"], "overlap_p_value": max(p_values) if p_values else None}


def measured_transforms(transforms: list[str]) -> list[str]:
    """The leaderboard's transform columns: each of the paper's transforms, and each graded corruption once (its
    columns are the means over its levels)."""
    return list(dict.fromkeys((parse_graded(t) or (t, 0))[0] for t in transforms))


def transform_measures(view: ModelTables, transforms: list[str]) -> dict[str, float | None]:
    """The per-transform TCAC columns of one model from its ``tcac_summary`` rows (null where missing); a graded
    corruption's columns average its levels' rows."""
    columns = measured_transforms(transforms)
    values: dict[str, list[float]] = {}
    summary = view.read(TCAC_SUMMARY) if view.exists(TCAC_SUMMARY) else None
    for row in summary.to_pylist() if summary is not None else []:
        if row["transform"] not in transforms:
            continue
        column = (parse_graded(row["transform"]) or (row["transform"], 0))[0]
        for prefix, measure in TRANSFORM_MEASURES.items():
            if row.get(measure) is not None:
                values.setdefault(f"{prefix}_{column}", []).append(float(row[measure]))
    return {f"{prefix}_{t}": (sum(v) / len(v) if (v := values.get(f"{prefix}_{t}")) else None)
            for t in columns for prefix in TRANSFORM_MEASURES}


def validation_rate(view: ModelTables) -> float | None:
    """Mean ``success_rate`` over the model's checked failure types (None when none was checked)."""
    checks = view.read(FAILURE_CHECKS, ["success_rate"]) if view.exists(FAILURE_CHECKS) else None
    if checks is None:
        return None
    rates = checks.column("success_rate").drop_null()
    return float(pc.mean(rates).as_py()) if len(rates) else None


def model_row(view: ModelTables, config: Config) -> dict[str, Any]:
    """One model's leaderboard row (without its rank)."""
    row: dict[str, Any] = {CLIP_MODEL: view.clip_model, **alignment(view, config)}
    images = row.get("images")
    row["daf_cases"] = view.count(DAF_CASES) if view.exists(DAF_CASES) else None
    row["blind_pairs"] = view.count(BLIND_PAIRS) if view.exists(BLIND_PAIRS) else None
    row["blind_pair_rate"] = (row["blind_pairs"] / images if images and row["blind_pairs"] is not None else None)
    row.update(transform_measures(view, config.tcac.transforms))
    named = failure_types.read_rows(view)
    row["failure_types"] = None if named is None else sum(r["namer"] == failure_types.LLM for r in named)
    row["contrast_types"] = None if named is None else sum(r["namer"] != failure_types.LLM for r in named)
    row["validation_success_rate"] = validation_rate(view)
    row["blindness"] = blindness(row.get("mean_overlap"), row["blind_pair_rate"])
    return row


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` ordered by blindness (most blind first; models without a score last), then ``clip_model``, with
    ``rank`` set (1 = most blind)."""
    ordered = sorted(rows, key=lambda r: (r["blindness"] is None, -(r["blindness"] or 0.0), r[CLIP_MODEL]))
    return [{**row, "rank": i + 1} for i, row in enumerate(ordered)]


def provenance_columns(recorded: dict[str, Any] | None, spec: str) -> dict[str, str | None]:
    """``model_ran``, ``weights_sha256`` and ``revision`` of CLIP-role model ``spec`` from the run's recorded
    ``models.json`` content (nulls where it is not recorded)."""
    entry = ((recorded or {}).get("clip") or {}).get(spec) or {}
    return {"model_ran": entry.get("ran"), "weights_sha256": entry.get("weights_sha256"),
            "revision": entry.get("revision")}


def build_leaderboard(config: Config, tables: RunTables) -> pa.Table:
    """The ranked ``leaderboard`` of every CLIP-role model of ``config`` (only those: one row each)."""
    recorded = read_models(config.run_dir)
    rows = [{**model_row(tables.for_clip_model(spec), config), **provenance_columns(recorded, spec)}
            for spec in config.models.clip_models]
    schema = leaderboard_schema(measured_transforms(config.tcac.transforms))
    ranked = rank_rows(rows)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in ranked], schema=schema)


def run_leaderboard(config: Config, tables: RunTables) -> StageStats:
    """Build and write the ``leaderboard`` table; its rows also go into the stats (``notes.leaderboard``)."""
    stats = StageStats(STAGE)
    started = time.perf_counter()
    table = build_leaderboard(config, tables)
    stats.add_time("measure", time.perf_counter() - started)
    phase = time.perf_counter()
    tables.replace(LEADERBOARD, table, table.schema)
    stats.add_time("write", time.perf_counter() - phase)
    stats.add_count("models", table.num_rows)
    stats.notes["leaderboard"] = table.to_pylist()
    stats.notes["score"] = "blindness = ((1 - mean_overlap) + min(1, blind_pair_rate)) / 2; rank 1 = most blind"
    stats.notes["summary"] = "leaderboard: " + ", ".join(
        f"{row['rank']}. {row[CLIP_MODEL]}{_ran(row)} ({_fmt(row['blindness'])})" for row in table.to_pylist())
    log.info("%s", stats.notes["summary"])
    stats.add_time("wall", time.perf_counter() - started)
    return stats


def _ran(row: dict[str, Any]) -> str:
    """`` -> ran SPEC`` where another spec ran than the one listed (a fallback); "" otherwise."""
    ran = row.get("model_ran")
    return f" -> ran {ran}" if ran and ran != row[CLIP_MODEL] else ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
