"""The table of stages: every stage of the pipeline, in order, with how to run it and what it needs.

A stage is one module under :mod:`clipaudit.stages` with a ``run_<stage>`` function, plus one entry here. The
entry's adapter hands the stage what it takes from a :class:`StageContext` (imports stay inside the adapters, so
the CLI's ``--help`` and light tests import no torch, Ray or LanceDB). The pipeline (:mod:`clipaudit.pipeline`)
walks this table; nothing else needs to know the list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables
    from clipaudit.records import StageStats


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


def _report(ctx: StageContext) -> StageStats:
    from clipaudit.stages.report import run_report

    return run_report(ctx.config, ctx.tables)


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("ingest", _ingest),
    Stage("embed", _embed, needs_models=True, schedules_models=True),
    Stage("neighbours", _neighbours),
    Stage("daf", _daf),
    Stage("tcac", _tcac, schedules_models=True),
    Stage("summarize", _summarize),
    Stage("validate", _validate),
    Stage("report", _report),
)
"""Every stage, in pipeline order."""
STAGES: list[str] = [stage.name for stage in STAGE_TABLE]
"""The stage names in pipeline order."""
_BY_NAME = {stage.name: stage for stage in STAGE_TABLE}


def stage_named(name: str) -> Stage:
    """The table entry of stage ``name`` (KeyError for an unknown name: validate with the pipeline first)."""
    return _BY_NAME[name]
