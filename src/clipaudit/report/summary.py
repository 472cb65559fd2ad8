"""The headline figures of a run, for machines: ``run_dir/summary.json``, and what ``clipaudit diff`` compares.

:func:`build_summary` computes the figures from the tables of a :class:`~clipaudit.run_view.RunView` (the stats
files add the timings and the permutation null, which only the latest run's files hold).
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.config import slot_name
from clipaudit.io import fs
from clipaudit.records import (
    BLIND_PAIRS,
    CLIP_MODEL,
    DAF_CASES,
    FAILURE_CHECKS,
    FAILURE_TYPES,
    IMAGE_EMBEDDINGS,
    LEADERBOARD,
    LLM_CALLS,
    NEIGHBOURS,
    REJECTS,
    RETRYABLE_REASONS,
    SAMPLES,
    TCAC_CASES,
    TCAC_SUMMARY,
)
from clipaudit.report.probe_truth import probe_section
from clipaudit.run_models import run_provenance
from clipaudit.run_view import RunView, is_random_spec
from clipaudit.transforms.severities import CORRUPTION_NAMES, is_graded, parse_graded

log = logging.getLogger("clipaudit.report")

SUMMARY_FILE = "summary.json"
HISTORY_DIR = "history"
"""``run_dir/history/<run_id>/summary.json``: the summary of every run that made a report, kept for diffs."""
SCHEMA_VERSION = 1
STAGE_TABLES = {"ingest": SAMPLES, "embed": IMAGE_EMBEDDINGS["clip"], "neighbours": NEIGHBOURS, "daf": DAF_CASES,
                "name": FAILURE_TYPES, "tcac": TCAC_SUMMARY, "summarize": LLM_CALLS, "validate": FAILURE_CHECKS}
"""The table whose presence shows that a stage ran, where its stats file is not there to say so. Its keys, in
pipeline order, are the stages a summary lists when it is not told the pipeline's own list (``stages``)."""


def stage_seconds(stats: dict[str, Any] | None) -> float | None:
    """A stage's wall time: ``seconds.wall``, else the sum of its phases."""
    if not stats:
        return None
    seconds = stats.get("seconds") or {}
    if "wall" in seconds:
        return float(seconds["wall"])
    return float(sum(seconds.values())) if seconds else None


def _column(table: pa.Table | None, name: str) -> list[Any]:
    return [] if table is None or name not in table.column_names else table.column(name).to_pylist()


def _models(view: RunView, embed_stats: dict[str, Any] | None) -> dict[str, str | None]:
    notes = (embed_stats or {}).get("notes") or {}
    models = dict(notes.get("models") or {})
    if view.clip_model is not None:
        requested = list(notes.get("clip_models") or [])
        if view.clip_model in requested:
            index = requested.index(view.clip_model)
            models["clip"] = models.get(slot_name("clip", index))
        else:
            models["clip"] = None
    for role, name in IMAGE_EMBEDDINGS.items():
        if not models.get(role):
            first = view.read(name, ["model"], where=None)
            values = _column(first.slice(0, 1) if first is not None else None, "model")
            models[role] = values[0] if values else None
    return {role: models.get(role) for role in IMAGE_EMBEDDINGS}


def _unique_ids(table: pa.Table | None, name: str) -> pa.Array:
    """The distinct values of a string column as an Arrow array (empty when the table or column is missing)."""
    if table is None or name not in table.column_names:
        return pa.array([], pa.string())
    return pc.unique(table.column(name)) if table.num_rows else pa.array([], pa.string())


def _only(ids: pa.Array, kept: pa.Array) -> pa.Array:
    """The values of ``ids`` that are also in ``kept``."""
    return ids.filter(pc.is_in(ids, value_set=kept, skip_nulls=False))


def _rejects_by_reason(rejects: pa.Table | None) -> dict[str, int]:
    """``{"stage/reason": rows}``, sorted by key (counted with Arrow's group_by)."""
    if rejects is None or rejects.num_rows == 0:
        return {}
    groups = rejects.group_by(["stage", "reason"]).aggregate([([], "count_all")]).to_pylist()
    return dict(sorted((f"{g['stage']}/{g['reason']}", g["count_all"]) for g in groups))


def _counts(view: RunView) -> dict[str, Any]:
    """Corpus accounting from the tables: samples in, images embedded by both roles, rejects by stage and reason.

    Ids are counted with Arrow (distinct values, membership): no Python object per image."""
    samples = _unique_ids(view.read(SAMPLES, ["image_id"]), "image_id")
    embedded = samples
    for name in IMAGE_EMBEDDINGS.values():
        embedded = _only(embedded, _unique_ids(view.read(name, ["image_id"]), "image_id"))
    rejects = view.read(REJECTS, ["stage", "item", "reason"])
    by_reason = _rejects_by_reason(rejects)
    embed_items = (rejects.filter(pc.equal(rejects.column("stage"), "embed")) if rejects is not None
                   and rejects.num_rows else None)
    embed_rejected = _only(_unique_ids(embed_items, "item"), samples)
    retryable = sum(n for key, n in by_reason.items() if key.split("/", 1)[1] in RETRYABLE_REASONS)
    return {"samples": len(samples), "in": len(samples), "embedded": len(embedded),
            "rejected": len(embed_rejected), "rejects": sum(by_reason.values()),
            "rejects_by_reason": by_reason, "rejects_retryable": retryable,
            "rejects_final": sum(by_reason.values()) - retryable, "retryable_reasons": sorted(RETRYABLE_REASONS),
            "captions_embedded": view.count("caption_embeddings")}


def _daf_from_neighbours(view: RunView) -> dict[str, Any] | None:
    """Overlap@k figures recomputed from the ``neighbours`` table (for a tagged run, whose stats are gone)."""
    table = view.read(NEIGHBOURS, ["image_id", "model", "ids"], where=view.first_reference_filter(NEIGHBOURS))
    if table is None or table.num_rows == 0:
        return None
    lists: dict[str, dict[str, list[str]]] = {"clip": {}, "reference": {}}
    for image_id, role, ids in zip(*(table.column(c).to_pylist() for c in ("image_id", "model", "ids"))):
        lists.setdefault(role, {})[image_id] = ids or []
    common = sorted(set(lists["clip"]) & set(lists["reference"]))
    if not common:
        return None
    k = max(len(lists["clip"][common[0]]), 1)
    shared = [len(set(lists["clip"][i]) & set(lists["reference"][i])) for i in common]
    overlaps = [c / k for c in shared]
    n = len(common)
    histogram = Counter(shared)
    chance = k / (n - 1) if n > 1 else None
    mean = statistics.fmean(overlaps)
    return {"k": k, "images": n, "mean_overlap": mean, "median_overlap": statistics.median(overlaps),
            "chance_overlap": chance, "alignment_over_chance": mean / chance if chance else None,
            "overlap_histogram": {f"{c}/{k}": histogram.get(c, 0) for c in range(k + 1)}, "source": "tables"}


def _daf(view: RunView) -> dict[str, Any] | None:
    if not view.exists(DAF_CASES):
        return None
    stats = view.stats("daf")
    notes = (stats or {}).get("notes") or {}
    if "mean_overlap" in notes:
        null = notes.get("null") or {}
        figures = {key: notes.get(key) for key in ("k", "images", "mean_overlap", "median_overlap", "mean_rbo",
                                                   "chance_overlap", "chance_rbo", "alignment_over_chance",
                                                   "overlap_histogram", "share_zero_overlap")}
        figures.update(null_p_value=null.get("corpus_p_value"), null_mean_overlap=null.get("mean_overlap"),
                       null_overlap_histogram=null.get("overlap_histogram"), source="stats")
    else:
        figures = _daf_from_neighbours(view) or {}
    figures["cases"] = view.count(DAF_CASES)
    figures["blind_pairs"] = view.count(BLIND_PAIRS)
    figures["blind_rule"] = notes.get("blind_pairs")
    return figures


_TCAC_FIGURES = ("images", "mean_changed", "top1_changed_share", "recall_at_1_before", "recall_at_1_after",
                 "recall_at_5_before", "recall_at_5_after", "recall_at_10_before", "recall_at_10_after",
                 "mean_tv_distance", "cases", "daf_cases")


def _tcac(view: RunView, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The TCAC figures per transform, in the configured order; without a config the paper's transforms by name,
    then the graded corruptions in their table's order, mildest level first."""
    table = view.read(TCAC_SUMMARY)
    if table is None:
        return None
    order = list(((config or {}).get("tcac") or {}).get("transforms") or [])

    def place(name: str) -> tuple[Any, ...]:
        graded = parse_graded(name) if is_graded(name) else None
        if name in order:
            return (0, order.index(name))
        if graded is None:
            return (1, name)
        return (2, CORRUPTION_NAMES.index(graded[0]), graded[1])

    rows = sorted(table.to_pylist(), key=lambda r: place(r["transform"]))
    return {"model": rows[0].get("model") if rows else None,
            "top_k": ((config or {}).get("tcac") or {}).get("top_k"),
            "rows": view.count(TCAC_CASES),
            "transforms": {row["transform"]: {key: row.get(key) for key in _TCAC_FIGURES} for row in rows}}


def _failure_types(view: RunView) -> list[dict[str, Any]] | None:
    table = view.read(FAILURE_TYPES)
    if table is None:
        return None
    checks = {}
    check_table = view.read(FAILURE_CHECKS)
    for row in ([] if check_table is None else check_table.to_pylist()):
        checks[(str(row.get("method") or ""), row["name"])] = row
        checks.setdefault(("", row["name"]), row)
    out = []
    for row in sorted(table.to_pylist(), key=lambda r: (r.get("namer") or "llm", str(r["method"]), r.get("rank") or 0,
                                                        str(r["name"]))):
        namer = row.get("namer") or "llm"
        check = (checks.get((str(row["method"]), row["name"])) or checks.get(("", row["name"]))
                 if namer == "llm" else None)
        out.append({
            "namer": namer, "method": row["method"], "name": row["name"], "description": row.get("description"),
            "terms": row.get("terms") or [], "evidence_pairs": row.get("evidence_pairs") or [],
            "support": row.get("support"), "batches": row.get("batches"), "rank": row.get("rank"),
            "example_ids": row.get("example_ids") or [], "aliases": row.get("aliases") or [],
            "success_rate": None if check is None else check.get("success_rate"),
            "n_pairs": None if check is None else check.get("n_pairs"),
            "mean_sim": None if check is None else check.get("mean_sim"),
            "check_status": None if check is None else check.get("status"),
        })
    return out


def _llm(view: RunView) -> dict[str, Any] | None:
    table = view.read(LLM_CALLS, ["kind", "status", "tokens", "cost"])
    if table is None:
        return None
    costs = [c for c in _column(table, "cost") if c is not None]
    return {"calls": table.num_rows, "by_status": dict(Counter(_column(table, "status"))),
            "by_kind": dict(Counter(_column(table, "kind"))),
            "tokens": int(sum(t or 0 for t in _column(table, "tokens"))),
            "cost_usd": float(sum(costs)) if costs else None}


def stage_status(view: RunView, stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per stage: whether it ran (its stats file or its output table is there), whether its output table exists
    (None for stages without one), its wall seconds and summary line."""
    out = {}
    for stage in stages:
        stats = view.stats(stage)
        table = STAGE_TABLES.get(stage)
        output = None if table is None else view.exists(table)
        ran = stats is not None or bool(output)
        notes = (stats or {}).get("notes") or {}
        out[stage] = {"ran": ran, "output": output, "seconds": stage_seconds(stats), "summary": notes.get("summary")}
    return out


def leaderboard_rows(view: RunView, specs: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    """The ``leaderboard`` rows ordered by rank (the stats' copy for a run whose table is gone); None when the
    leaderboard stage has not run. ``specs``: the run's CLIP-role models; rows of other models (taken off
    ``models.clip`` since the leaderboard stage last ran) are left out and the others ranked again in order."""
    table = view.read(LEADERBOARD)
    if table is not None:
        rows = table.to_pylist()
    else:
        rows = ((view.stats("leaderboard") or {}).get("notes") or {}).get("leaderboard")
        if rows is None:
            return None
    rows = sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, str(r.get(CLIP_MODEL))))
    if specs is not None and any(row.get(CLIP_MODEL) not in specs for row in rows):
        rows = [{**row, "rank": i + 1} for i, row in enumerate(r for r in rows if r.get(CLIP_MODEL) in specs)]
    return rows


def build_summary(view: RunView, run_id: str | None = None, stages: Sequence[str] = tuple(STAGE_TABLES)
                  ) -> dict[str, Any]:
    """The headline figures of the run ``view`` shows (see the module docstring); sections of stages that did not
    run are None.

    A run of several CLIP-role models: the figures are those of the first model (as a one-model run has them),
    with ``clip_models`` (the specs), ``leaderboard`` (its rows by rank) and ``per_model`` (spec -> the summary
    of that model's view) added; ``stages`` and ``provenance`` are the whole run's. ``stages``: the stages to
    list (the report stage passes the pipeline's stage table).

    ``provenance``: the weights each model ran with (``run_dir/models.json`` for the run's models, see
    :func:`clipaudit.run_models.run_provenance`; a model's own summary has its CLIP entry and the references); None
    where no run recorded them."""
    specs = view.clip_models() if view.clip_model is None else []
    if len(specs) > 1:
        per_model = {spec: build_summary(view.for_clip_model(spec), run_id, stages) for spec in specs}
        return {**per_model[specs[0]], "stages": stage_status(view, stages), "clip_models": specs,
                "leaderboard": leaderboard_rows(view, specs), "per_model": per_model,
                "provenance": run_provenance(view.run_dir, view.config())}
    return _build_summary(view, run_id, stages)


def _build_summary(view: RunView, run_id: str | None, stages: Sequence[str]) -> dict[str, Any]:
    config = view.config()
    embed_stats = view.stats("embed")
    models = _models(view, embed_stats)
    notes = (embed_stats or {}).get("notes") or {}
    tcac_notes = (view.stats("tcac") or {}).get("notes") or {}
    if view.clip_model is not None and "random_models" in notes:
        random_models = (any(is_random_spec(spec) for spec in models.values())
                         or bool(tcac_notes.get("random_model")))
    elif "random_models" in notes or "random_model" in tcac_notes:
        random_models = bool(notes.get("random_models")) or bool(tcac_notes.get("random_model"))
    else:
        random_models = any(is_random_spec(spec) for spec in models.values())
    requested = {role: ((config or {}).get("models") or {}).get(role) for role in IMAGE_EMBEDDINGS}
    dataset = {key: value for key, value in ((config or {}).get("dataset") or {}).items()
               if key in ("format", "captions", "images", "caption_choice", "limit", "num_images", "seed")}
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id or view.run_id(),
        "run_dir": view.run_dir,
        "tag": view.version,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": models,
        "models_requested": requested if config else None,
        "provenance": run_provenance(view.run_dir, config, view.clip_model),
        "random_models": random_models,
        "dataset": dataset or None,
        "stages": stage_status(view, stages),
        "counts": _counts(view),
        "daf": _daf(view),
        "tcac": _tcac(view, config),
        "failure_types": _failure_types(view),
        "llm": _llm(view),
        "probe": probe_section(view, models.get("clip")),
        "table_versions": view.versions(),
    }


def history_path(run_dir: str, run_id: str) -> str:
    """Where the summary of run ``run_id`` is kept: ``run_dir/history/<run_id>/summary.json``."""
    return fs.join(run_dir, HISTORY_DIR, run_id, SUMMARY_FILE)


def load_summary(view: RunView) -> dict[str, Any]:
    """The summary of the run ``view`` shows: for a tagged run its kept ``history/<run_id>/summary.json``, else
    ``summary.json``; computed from the tables where there is no such file (the report stage did not run)."""
    path = history_path(view.run_dir, view.version) if view.version else fs.join(view.run_dir, SUMMARY_FILE)
    if fs.exists(path):
        return fs.read_json(path)
    log.info("%s: no %s, computing the summary from the tables", view.label, path)
    return build_summary(view)
