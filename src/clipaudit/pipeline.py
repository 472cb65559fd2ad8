"""Runs stages in order over one run directory: the resolved config and per-stage stats are written beside
the tables, models are resolved (and their weights checked) before any work starts, and Ray is started only
for the stages that need it.

Resolved models are checked against those the run directory recorded (``models.json``, see
:mod:`clipaudit.run_models`): a resumed run whose models now run other weights is refused before any stage runs,
unless it is a new run (``new_run``: the earlier run is moved under ``run_dir/previous/<timestamp>/`` first)."""

from __future__ import annotations

import logging
from dataclasses import asdict

import yaml

from clipaudit.config import Config
from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.records import StageStats
from clipaudit.run_models import check_and_record, current_provenance, move_run_aside
from clipaudit.runs import finish_run, start_run
from clipaudit.stages.table import STAGES, StageContext, run_stage, stage_named

__all__ = ["STAGES", "StageError", "parse_stages", "run_pipeline"]

log = logging.getLogger("clipaudit")


class StageError(ClipauditError, ValueError):
    """An unknown or misordered stage name."""


def parse_stages(text: str | None) -> list[str]:
    """``ingest,embed`` -> the stage list, validated; None -> every stage."""
    if not text:
        return list(STAGES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise StageError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    return sorted(set(names), key=STAGES.index)


def write_resolved_config(config: Config) -> str:
    """Write the resolved configuration into ``run_dir/config.resolved.yaml`` and return its path."""
    path = fs.join(config.run_dir, "config.resolved.yaml")
    fs.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def write_stats(config: Config, stats: StageStats) -> None:
    """Write a stage's counts and timings to ``run_dir/stats/<stage>.json``."""
    fs.write_json(fs.join(config.run_dir, "stats", f"{stats.stage}.json"), asdict(stats))


def resolve_models(config: Config) -> dict:
    """Resolve every model on the driver (weights checked now, not in the actors): slot name -> model, the
    CLIP-role models in config order (``ModelsConfig.clip_slots``), then the references (``reference_slots``)."""
    from clipaudit.models import resolve_model

    m = config.models
    slots = [(slot, spec, "clip") for slot, spec in m.clip_slots.items()]
    slots += [(slot, spec, "reference") for slot, spec in m.reference_slots.items()]
    models = {slot: resolve_model(spec, role, fallback=m.fallback, cache_dir=m.cache_dir)
              for slot, spec, role in slots}
    if any(model.is_random for model in models.values()):
        log.warning("RANDOM MODELS: %s. Their findings are meaningless; this run only shows the pipeline works.",
                    ", ".join(f"{slot}={model.spec} (asked for {model.requested_spec})"
                              for slot, model in models.items() if model.is_random))
    return models


def record_models(config: Config, models: dict) -> dict:
    """Check the resolved ``models`` (slot name -> model) against the models ``run_dir/models.json`` recorded and
    record them there; returns the file's content. Raises
    :class:`~clipaudit.run_models.ModelsChangedError` when a recorded spec now runs another model or other
    weights."""
    current = current_provenance(config.models.clip_slots, config.models.reference_slots, models)
    return check_and_record(config.run_dir, current)


def run_pipeline(config: Config, stages: list[str], new_run: bool = False) -> dict[str, StageStats]:
    """Run ``stages`` in order and return their stats. ``new_run``: first move the earlier run of the run
    directory aside (:func:`~clipaudit.run_models.move_run_aside`), so that models whose weights changed start
    from empty tables."""
    from clipaudit.runtime import LazyRunner

    fs.makedirs(config.run_dir)
    if new_run:
        move_run_aside(config.run_dir)
    models = resolve_models(config) if any(stage_named(name).needs_models for name in stages) else {}
    if models:
        record_models(config, models)
    write_resolved_config(config)
    results: dict[str, StageStats] = {}
    runner = LazyRunner(config)
    run_id = start_run(config.run_dir, stages)
    log.info("run %s in %s", run_id, config.run_dir)
    tables = None
    versions_before: dict[str, int] = {}
    try:
        if config.ray.runner == "ray" and any(stage_named(name).schedules_models for name in stages):
            runner.get()
        from clipaudit.io.tables import RunTables

        tables = RunTables(config.run_dir)
        versions_before = tables.versions()
        context = StageContext(config, tables, runner, models)
        for stage in stages:
            log.info("stage %s", stage)
            stats = run_stage(stage, context)
            write_stats(config, stats)
            results[stage] = stats
    except BaseException as exc:
        _record_failure(config.run_dir, run_id, tables, versions_before, exc)
        raise
    finally:
        runner.close()
    tags = finish_run(config.run_dir, run_id, tables, versions_before)
    log.info("run %s finished; %d tables tagged %s", run_id, len(tags), run_id)
    return results


def _record_failure(run_dir: str, run_id: str, tables, versions_before: dict[str, int], exc: BaseException) -> None:
    """Record a failed run in its run record (its tables are not tagged); never masks the original error."""
    try:
        finish_run(run_dir, run_id, tables, versions_before, status="failed", error=type(exc).__name__)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("could not record the failure of run %s in its run record", run_id, exc_info=True)
