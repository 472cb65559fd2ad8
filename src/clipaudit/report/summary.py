"""The headline figures of a run, for machines: ``run_dir/summary.json``, and what ``clipaudit diff`` compares.

:class:`RunView` is a run directory as the report reads it: its tables as they are now, or as an earlier run left
them (``RUN_DIR@RUN_ID``: the LanceDB tags a finished run puts on every table, see :mod:`clipaudit.runs`), plus its
stats and resolved config. :func:`build_summary` computes the figures from the tables (the stats files add the
timings and the permutation null, which only the latest run's files hold).
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from clipaudit.config import slot_name
from clipaudit.errors import ClipauditError
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
    REFERENCE_MODEL,
    REJECTS,
    RETRYABLE_REASONS,
    SAMPLES,
    TCAC_CASES,
    TCAC_SUMMARY,
)
from clipaudit.report.probe_truth import probe_section
from clipaudit.runs import current_run_id, finished_runs, previous_run_id

log = logging.getLogger("clipaudit.report")

SUMMARY_FILE = "summary.json"
HISTORY_DIR = "history"
"""``run_dir/history/<run_id>/summary.json``: the summary of every run that made a report, kept for diffs."""
SCHEMA_VERSION = 1
STAGE_TABLES = {"ingest": SAMPLES, "embed": IMAGE_EMBEDDINGS["clip"], "neighbours": NEIGHBOURS, "daf": DAF_CASES,
                "name": FAILURE_TYPES, "tcac": TCAC_SUMMARY, "summarize": LLM_CALLS, "validate": FAILURE_CHECKS}
"""The table whose presence shows that a stage ran, where its stats file is not there to say so."""
_RANDOM_SPEC = re.compile(r"^(tiny-|hf-random:)|/random$")


class RunViewError(ClipauditError, ValueError):
    """A run directory or run id that cannot be read."""


class RunView:
    """A run directory's tables, stats and config; ``version`` (a run id) reads the tables as that run left them.

    ``clip_model`` (a spec of ``models.clip``): the view of one CLIP-role model of a run that audited several
    (see :meth:`for_clip_model`); None: the whole run."""

    def __init__(self, run_dir: str, version: str | None = None, tables: Any = None,
                 clip_model: str | None = None) -> None:
        if tables is None:
            if not fs.exists(fs.join(run_dir, "lancedb")):
                raise RunViewError(f"{run_dir}: not a clipaudit run directory (no lancedb/ folder)")
            from clipaudit.io.tables import RunTables

            tables = RunTables(run_dir)
        if clip_model is not None and getattr(tables, "clip_model", None) != clip_model:
            tables = tables.for_clip_model(clip_model)
        self.run_dir = run_dir
        self.version = version
        self.tables = tables
        self.clip_model = clip_model
        self._names: set[str] | None = None

    def for_clip_model(self, spec: str) -> RunView:
        """The view of one CLIP-role model (same run, same version): its tables are
        :meth:`~clipaudit.io.tables.RunTables.for_clip_model`'s, its stats of a per-model stage are that model's
        own (``notes.per_model[spec]``), its config has ``models.clip`` set to ``spec``."""
        view = RunView(self.run_dir, self.version, tables=self.tables.for_clip_model(spec), clip_model=spec)
        view._names = self._names
        return view

    def clip_models(self) -> list[str]:
        """The CLIP-role specs of the run: ``models.clip`` of its resolved config (a spec or a list), else the
        distinct ``clip_model`` values of its CLIP image embeddings (first seen first), else []."""
        models = (self.config() or {}).get("models") or {}
        specs = models.get("clip")
        if isinstance(specs, str) and specs:
            return [specs]
        if isinstance(specs, list) and specs:
            return [str(spec) for spec in specs]
        name = IMAGE_EMBEDDINGS["clip"]
        has_column = getattr(self.tables, "has_column", None)
        if not self.exists(name) or has_column is None or not has_column(name, CLIP_MODEL):
            return []
        table = self.read(name, [CLIP_MODEL])
        if table is None or table.num_rows == 0:
            return []
        return [str(v) for v in pc.unique(table.column(CLIP_MODEL)).to_pylist() if v]

    def first_reference_filter(self, name: str) -> str | None:
        """The SQL predicate leaving out the rows of every reference model but the first in table ``name`` (the
        reference embeddings, or ``neighbours``, whose CLIP rows have no reference) when the run has several
        references; None with one reference, or for a table without ``reference_model``."""
        references = ((self.config() or {}).get("models") or {}).get("reference")
        if not isinstance(references, list) or len(references) < 2 or not self.exists(name):
            return None
        if REFERENCE_MODEL not in self.tables.db.open_table(name).schema.names:
            return None
        return in_filter(REFERENCE_MODEL, ["", str(references[0])])

    @classmethod
    def parse(cls, spec: str) -> RunView:
        """``RUN_DIR``, ``RUN_DIR@RUN_ID`` (a finished run's tagged tables) or ``RUN_DIR@previous`` (the finished
        run before the latest)."""
        run_dir, version = spec, None
        if "@" in spec and not fs.exists(spec):
            run_dir, version = spec.rsplit("@", 1)
            if version == "previous":
                version = previous_run_id(run_dir)
                if version is None:
                    raise RunViewError(f"{run_dir}: fewer than two finished runs in its run records, no previous run")
            elif version == "latest":
                done = finished_runs(run_dir)
                if not done:
                    raise RunViewError(f"{run_dir}: no finished run in its run records")
                version = done[-1]
            elif version not in finished_runs(run_dir):
                raise RunViewError(f"{run_dir}: no finished run {version!r} (finished: "
                                   f"{', '.join(finished_runs(run_dir)) or 'none'})")
        return cls(run_dir, version)

    @property
    def label(self) -> str:
        """How this view is named in messages: the run directory, ``@run id`` when it is a tagged one."""
        return f"{self.run_dir}@{self.version}" if self.version else self.run_dir

    def exists(self, name: str) -> bool:
        """Whether table ``name`` exists (at the tagged version, when there is one)."""
        if self._names is None:
            self._names = self.tables.names()
        if name not in self._names:
            return False
        return self.version is None or self.version in self.tables.tags(name)

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table | None:
        """A table (at the tagged version, when there is one), None if it does not exist."""
        if not self.exists(name):
            return None
        if self.version is None:
            return self.tables.read(name, columns, where)
        return self.tables.read(name, columns, where, version=self.version)

    def count(self, name: str) -> int | None:
        """Rows of a table; None if it does not exist."""
        if not self.exists(name):
            return None
        if self.version is None:
            return self.tables.count(name)
        table = self.read(name, self._first_column(name))
        return None if table is None else table.num_rows

    def _first_column(self, name: str) -> list[str]:
        return [self.tables.db.open_table(name).schema.names[0]]

    def versions(self) -> dict[str, int]:
        """Table versions: the current ones, or those the tag points at."""
        if self.version is None:
            return self.tables.versions()
        return {name: self.tables.tags(name)[self.version] for name in sorted(self.tables.names())
                if self.version in self.tables.tags(name)}

    def stats(self, stage: str) -> dict[str, Any] | None:
        """``stats/<stage>.json`` of the latest run (None for a tagged view: the files describe the latest run)."""
        if self.version is not None:
            return None
        path = fs.join(self.run_dir, "stats", f"{stage}.json")
        stats = fs.read_json(path) if fs.exists(path) else None
        if self.clip_model is None or not isinstance(stats, dict):
            return stats
        per_model = (stats.get("notes") or {}).get("per_model")
        if isinstance(per_model, dict):
            own = per_model.get(self.clip_model)
            return None if own is None else {"stage": stage, **own}
        return stats

    def config(self) -> dict[str, Any] | None:
        """The resolved config of the latest run (None for a tagged view or where there is none)."""
        if self.version is not None:
            return None
        path = fs.join(self.run_dir, "config.resolved.yaml")
        config = yaml.safe_load(fs.read_text(path)) if fs.exists(path) else None
        if self.clip_model is not None and isinstance(config, dict):
            config = {**config, "models": {**(config.get("models") or {}), "clip": self.clip_model}}
        return config

    def run_id(self) -> str | None:
        """The run this view shows: the tag, or the latest run started in the directory."""
        return self.version or current_run_id(self.run_dir)

    def samples(self, image_ids: Iterable[str], columns: Sequence[str] = ("image_id", "uri", "caption")
                ) -> dict[str, dict[str, Any]]:
        """``samples`` rows of the given image ids, by id (read in chunks with an ``IN`` filter)."""
        ids = sorted({str(i) for i in image_ids})
        out: dict[str, dict[str, Any]] = {}
        wanted = list(dict.fromkeys(["image_id", *columns]))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            table = self.read(SAMPLES, wanted, where=in_filter("image_id", chunk))
            if table is not None:
                out.update({row["image_id"]: row for row in table.to_pylist()})
        return out


def in_filter(column: str, values: Sequence[str]) -> str:
    """A SQL ``column IN (...)`` predicate over string values (quotes doubled)."""
    quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})" if values else "false"


def is_random_spec(spec: str | None) -> bool:
    """Whether a model spec names random weights (``tiny-*``, ``hf-random:``, ``.../random``)."""
    return bool(spec) and bool(_RANDOM_SPEC.search(str(spec)))


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
    table = view.read(TCAC_SUMMARY)
    if table is None:
        return None
    rows = table.to_pylist()
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


def leaderboard_rows(view: RunView) -> list[dict[str, Any]] | None:
    """The ``leaderboard`` rows ordered by rank (the stats' copy for a run whose table is gone); None when the
    leaderboard stage has not run."""
    table = view.read(LEADERBOARD)
    if table is not None:
        rows = table.to_pylist()
    else:
        rows = ((view.stats("leaderboard") or {}).get("notes") or {}).get("leaderboard")
        if rows is None:
            return None
    return sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, str(r.get(CLIP_MODEL))))


def build_summary(view: RunView, run_id: str | None = None, stages: Sequence[str] | None = None) -> dict[str, Any]:
    """The headline figures of the run ``view`` shows (see the module docstring); sections of stages that did not
    run are None.

    A run of several CLIP-role models: the figures are those of the first model (as a one-model run has them),
    with ``clip_models`` (the specs), ``leaderboard`` (its rows by rank) and ``per_model`` (spec -> the summary
    of that model's view) added; ``stages`` is the whole run's."""
    from clipaudit.stages.table import STAGES

    specs = view.clip_models() if view.clip_model is None else []
    if len(specs) > 1:
        per_model = {spec: build_summary(view.for_clip_model(spec), run_id, stages) for spec in specs}
        return {**per_model[specs[0]], "stages": stage_status(view, stages or STAGES), "clip_models": specs,
                "leaderboard": leaderboard_rows(view), "per_model": per_model}
    return _build_summary(view, run_id, stages or STAGES)


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
