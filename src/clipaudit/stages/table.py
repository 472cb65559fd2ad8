"""The table of stages: every stage of the pipeline, in order, with how to run it and what it needs.

A stage is one module under :mod:`clipaudit.stages` with a ``run_<stage>`` function, plus one entry here. The
entry's adapter hands the stage what it takes from a :class:`StageContext` (imports stay inside the adapters, so
the CLI's ``--help`` and light tests import no torch, Ray or LanceDB). The pipeline (:mod:`clipaudit.pipeline`)
walks this table through :func:`run_stage`; nothing else needs to know the list.

A stage marked ``per_clip_model`` audits one CLIP-role model at a time: with ``models.clip`` a list, it runs once
per model, with the config narrowed to that model and the tables seen through that model's view
(:class:`~clipaudit.io.tables.ModelTables`); its stats are the sum over the models, with each model's own under
``notes.per_model``. The other stages see every model at once (embed decodes each image once for all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables
    from clipaudit.records import StageStats

log = logging.getLogger("clipaudit")


@dataclass(frozen=True)
class StageContext:
    """What a stage may use: the config, the run's tables, the (lazily started) runner, the resolved models."""

    config: Config
    tables: RunTables
    runner: Any
    models: dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its adapter, and whether it needs the models resolved or Ray started beforehand."""

    name: str
    run: Callable[[StageContext], StageStats]
    needs_models: bool = False
    """Models are resolved (and their weights checked) on the driver before any stage runs."""
    schedules_models: bool = False
    """Model work on Ray: Ray is started before the first such stage (and before LanceDB is imported, which
    keeps Ray's workers from warning about fork)."""
    per_clip_model: bool = False
    """Runs once per CLIP-role model of ``models.clip`` (see the module docstring)."""


def _ingest(ctx: StageContext) -> StageStats:
    from clipaudit.stages.ingest import run_ingest

    return run_ingest(ctx.config, ctx.tables)


def _embed(ctx: StageContext) -> StageStats:
    from clipaudit.stages.embed import run_embed, summary_line

    stats = run_embed(ctx.tables, ctx.runner, ctx.models, ctx.config.embed)
    stats.notes["summary"] = summary_line(stats)
    print(stats.notes["summary"], flush=True)
    return stats


def _neighbours(ctx: StageContext) -> StageStats:
    from clipaudit.stages.neighbours import run_neighbours

    return run_neighbours(ctx.config, ctx.tables, ctx.runner)


def _daf(ctx: StageContext) -> StageStats:
    from clipaudit.stages.daf import run_daf

    return run_daf(ctx.config, ctx.tables)


def _name(ctx: StageContext) -> StageStats:
    from clipaudit.stages.name import run_name

    return run_name(ctx.config, ctx.tables)


def _tcac(ctx: StageContext) -> StageStats:
    import logging

    from clipaudit.stages.tcac import run_tcac

    stats = run_tcac(ctx.config, ctx.tables, ctx.runner, ctx.models.get("clip"))
    logging.getLogger("clipaudit").info("%s", stats.notes["summary"])
    return stats


def _summarize(ctx: StageContext) -> StageStats:
    from clipaudit.stages.summarize import run_summarize

    return run_summarize(ctx.config, ctx.tables, ctx.runner)


def _validate(ctx: StageContext) -> StageStats:
    from clipaudit.stages.validate import run_validate

    return run_validate(ctx.config, ctx.tables, ctx.runner)


def _leaderboard(ctx: StageContext) -> StageStats:
    from clipaudit.stages.leaderboard import run_leaderboard

    return run_leaderboard(ctx.config, ctx.tables)


def _report(ctx: StageContext) -> StageStats:
    from clipaudit.stages.report import run_report

    return run_report(ctx.config, ctx.tables, STAGES)


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("ingest", _ingest),
    Stage("embed", _embed, needs_models=True, schedules_models=True),
    Stage("neighbours", _neighbours),
    Stage("daf", _daf, per_clip_model=True),
    Stage("name", _name, per_clip_model=True),
    Stage("tcac", _tcac, schedules_models=True, per_clip_model=True),
    Stage("summarize", _summarize, per_clip_model=True),
    Stage("validate", _validate, per_clip_model=True),
    Stage("leaderboard", _leaderboard),
    Stage("report", _report),
)
"""Every stage, in pipeline order."""
STAGES: list[str] = [stage.name for stage in STAGE_TABLE]
"""The stage names in pipeline order."""
_BY_NAME = {stage.name: stage for stage in STAGE_TABLE}


def stage_named(name: str) -> Stage:
    """The table entry of stage ``name`` (KeyError for an unknown name: validate with the pipeline first)."""
    return _BY_NAME[name]


def model_context(ctx: StageContext, slot: str, spec: str) -> StageContext:
    """``ctx`` narrowed to one CLIP-role model: its config, its view of the tables, its resolved model as ``clip``."""
    models = {name: model for name, model in ctx.models.items() if model.role == "reference"}
    if slot in ctx.models:
        models["clip"] = ctx.models[slot]
    return replace(ctx, config=ctx.config.for_clip_model(spec), tables=ctx.tables.for_clip_model(spec, slot),
                   models=models)


def run_stage(name: str, ctx: StageContext) -> StageStats:
    """Run stage ``name``: once, or once per CLIP-role model for a ``per_clip_model`` stage (stats merged)."""
    stage = stage_named(name)
    slots = ctx.config.models.clip_slots
    if not stage.per_clip_model or len(slots) == 1:
        return stage.run(ctx)
    per_model = {}
    for number, (slot, spec) in enumerate(slots.items(), start=1):
        log.info("stage %s, CLIP model %d of %d: %s", name, number, len(slots), spec)
        per_model[spec] = stage.run(model_context(ctx, slot, spec))
    return merge_stats(name, per_model)


def merge_stats(name: str, per_model: dict[str, StageStats]) -> StageStats:
    """One stage's stats over several CLIP-role models: counts and seconds summed, each model's stats (counts,
    seconds, notes) under ``notes.per_model`` by spec, each model's one-line summary under ``notes.summary``."""
    from clipaudit.records import StageStats

    merged = StageStats(name)
    for stats in per_model.values():
        for key, value in stats.counts.items():
            merged.add_count(key, value)
        for key, value in stats.seconds.items():
            merged.add_time(key, value)
    merged.notes["per_model"] = {spec: {k: v for k, v in asdict(stats).items() if k != "stage"}
                                 for spec, stats in per_model.items()}
    summaries = {spec: stats.notes["summary"] for spec, stats in per_model.items() if "summary" in stats.notes}
    if summaries:
        merged.notes["summary"] = "; ".join(f"[{spec}] {line}" for spec, line in summaries.items())
    return merged
