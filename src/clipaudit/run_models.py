"""Which weights the models of a run directory ran with: ``RUN_DIR/models.json``, written and checked by the pipeline,
read by the report, the leaderboard and the export.

``models.json`` is ``{"clip": {SPEC: provenance}, "reference": {SPEC: provenance}}``, SPEC as written in the config
and provenance as :func:`clipaudit.models.provenance.provenance` describes it (the spec asked for, the spec that ran,
a fallback, the source, the Hugging Face revision, the weight files and their SHA-256). It holds every model whose
rows the run directory's tables may hold: a model taken off ``models.clip`` keeps its entry (its rows stay in the
tables), and readers pick the models of the run (:func:`run_provenance`).

A run that resolves its models (:func:`check_and_record`) compares them with the recorded ones before any stage
runs: a spec that now runs another model (a fallback that did not happen before, or the reverse) or other weights
(another SHA-256) would mix two models' rows under one key, so the run is refused
(:class:`ModelsChangedError`) unless it is a new run: :func:`move_run_aside` moves the earlier run's tables, stats
and records under ``RUN_DIR/previous/<timestamp>/`` (a run directory of its own, which ``clipaudit diff`` and
``export`` read), on a local disk only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from clipaudit.errors import ClipauditError
from clipaudit.io import fs

log = logging.getLogger("clipaudit")

MODELS_FILE = "models.json"
"""The provenance of a run directory's models, in ``run_dir``."""
PREVIOUS_DIR = "previous"
"""Where ``--new-run`` moves an earlier run: ``run_dir/previous/<timestamp>/``."""
RUN_CONTENTS = ("lancedb", "stats", MODELS_FILE, "runs", "runs.jsonl", "history", "summary.json", "report",
                "config.resolved.yaml")
"""What a new run moves aside (what exists of it): the tables, the stats, the models, the run records and the
summaries and report made of them, so that ``previous/<timestamp>/`` is a run directory that reads back whole."""
ROLES = ("clip", "reference")
SHORT_SHA = 12
"""Hex digits of a weights hash shown on pages and in the card."""


class ModelsChangedError(ClipauditError, ValueError):
    """A resumed run whose models differ from those that wrote the run directory's tables."""


class NewRunError(ClipauditError, ValueError):
    """A new run that cannot move the earlier one aside (a run directory on an object store)."""


def models_path(run_dir: str) -> str:
    """``run_dir/models.json``."""
    return fs.join(run_dir, MODELS_FILE)


def read_models(run_dir: str) -> dict[str, dict[str, dict[str, Any]]] | None:
    """The recorded ``models.json`` of ``run_dir`` (``{"clip": {...}, "reference": {...}}``), None without one or
    when it cannot be read."""
    path = models_path(run_dir)
    if not fs.exists(path):
        return None
    try:
        data = fs.read_json(path)
    except (OSError, ValueError):
        log.warning("%s cannot be read; the run's model provenance is unknown", path)
        return None
    if not isinstance(data, dict):
        return None
    return {role: dict(data.get(role) or {}) for role in ROLES}


def current_provenance(clip_slots: Mapping[str, str], reference_slots: Mapping[str, str],
                       models: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"clip": {SPEC: provenance}, "reference": {SPEC: provenance}}`` of the resolved ``models`` (slot name ->
    ResolvedModel), SPEC as written in the config (the slots' specs: ``ModelsConfig.clip_slots`` /
    ``reference_slots``); each model's weights hashed once."""
    from clipaudit.models.provenance import provenance

    out: dict[str, dict[str, dict[str, Any]]] = {role: {} for role in ROLES}
    for role, slots in (("clip", clip_slots), ("reference", reference_slots)):
        for slot, spec in slots.items():
            if slot in models:
                out[role][spec] = provenance(models[slot])
    return out


def changed_models(recorded: Mapping[str, Mapping[str, Any]] | None,
                   current: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, dict, dict]]:
    """(role, spec, recorded entry, current entry) of every model of ``current`` that the run directory recorded
    with another model that ran or other weights (``ran`` or ``weights_sha256`` differ); a model not recorded yet
    is no change."""
    changed = []
    for role in ROLES:
        before = (recorded or {}).get(role) or {}
        for spec, entry in (current.get(role) or {}).items():
            old = before.get(spec)
            if old is None:
                continue
            if old.get("ran") != entry.get("ran") or old.get("weights_sha256") != entry.get("weights_sha256"):
                changed.append((role, spec, dict(old), dict(entry)))
    return changed


def _what(entry: Mapping[str, Any]) -> str:
    sha = entry.get("weights_sha256")
    weights = f"weights sha256 {sha}" if sha else f"no weight files ({entry.get('source') or 'unknown source'})"
    return f"ran {entry.get('ran')!r}{' (fallback)' if entry.get('fallback') else ''}, {weights}"


def changed_message(run_dir: str, changed: list[tuple[str, str, dict, dict]]) -> str:
    """The error of a resumed run whose models changed: each model, what ran and its weights before and now, and
    how to proceed."""
    lines = [f"models.{role} {spec!r}: the run directory's tables were computed with {_what(old)}; this run has "
             f"{_what(new)}" for role, spec, old, new in changed]
    how = ("use a new run_dir" if fs.is_remote(run_dir) else
           f"use a new run_dir, or start a new run in this one with `clipaudit run --new-run` (the earlier tables, "
           f"stats and records move to {fs.join(run_dir, PREVIOUS_DIR, '<timestamp>')}/)")
    return (f"{run_dir}: the models changed since the earlier run in this run directory, and resuming would mix "
            f"two models' results under one name: " + "; ".join(lines) + f". To audit the new weights, {how}.")


def check_and_record(run_dir: str, current: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compare ``current`` (see :func:`current_provenance`) with ``run_dir/models.json`` and write the merged file
    (recorded models kept, current ones updated, new ones added); returns what was written.

    Raises :class:`ModelsChangedError` (nothing written) when a recorded model now runs another model or other
    weights."""
    recorded = read_models(run_dir)
    changed = changed_models(recorded, current)
    if changed:
        raise ModelsChangedError(changed_message(run_dir, changed))
    merged = {role: {**((recorded or {}).get(role) or {}), **(current.get(role) or {})} for role in ROLES}
    if merged != recorded:
        fs.write_json(models_path(run_dir), merged)
    return merged


def _local(path: str) -> str:
    return path.removeprefix("file://")


def has_earlier_run(run_dir: str) -> bool:
    """Whether ``run_dir`` holds anything a new run moves aside (see :data:`RUN_CONTENTS`)."""
    return any(fs.exists(fs.join(run_dir, name)) for name in RUN_CONTENTS)


def move_run_aside(run_dir: str, now: datetime | None = None) -> str | None:
    """Start a new run in ``run_dir``: move what an earlier run left (:data:`RUN_CONTENTS`) under
    ``run_dir/previous/<timestamp>/`` and return that folder; None when there was nothing to move.

    Raises :class:`NewRunError` for a run directory on an object store (moving its objects would copy them all:
    use a new run_dir instead)."""
    if not has_earlier_run(run_dir):
        return None
    if fs.is_remote(run_dir):
        raise NewRunError(f"{run_dir}: --new-run moves an earlier run aside only in a local run directory; on an "
                          "object store use a new run_dir instead")
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(_local(run_dir), PREVIOUS_DIR)
    target, n = os.path.join(base, stamp), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(base, f"{stamp}-{n}")
    os.makedirs(target)
    moved = []
    for name in RUN_CONTENTS:
        source = os.path.join(_local(run_dir), name)
        if os.path.lexists(source):
            os.rename(source, os.path.join(target, name))
            moved.append(name)
    log.warning("new run: the earlier run of %s (%s) moved to %s", run_dir, ", ".join(moved), target)
    return target


def run_provenance(run_dir: str, config: Mapping[str, Any] | None,
                   clip_model: str | None = None) -> dict[str, dict[str, dict[str, Any]]] | None:
    """The provenance of the run's models from ``run_dir/models.json`` (None without the file): the specs of
    ``config`` (a resolved config as a dict: ``models.clip`` and ``models.reference``, each a spec or a list), or
    every recorded model where there is no config (a tagged run: any model recorded ran with the same weights in
    every run of the directory); ``clip_model``: only that CLIP-role model (and the references)."""
    recorded = read_models(run_dir)
    if recorded is None:
        return None
    models = (config or {}).get("models") or {}
    out = {}
    for role in ROLES:
        wanted = _specs(models.get(role)) if config else list(recorded[role])
        if role == "clip" and clip_model is not None:
            wanted = [clip_model]
        out[role] = {spec: recorded[role][spec] for spec in wanted if spec in recorded[role]}
    return out


def _specs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value or []]


def short_sha(sha: str | None) -> str | None:
    """The first :data:`SHORT_SHA` hex digits of a hash (None stays None)."""
    return sha[:SHORT_SHA] if sha else None


def ran_note(entry: Mapping[str, Any] | None) -> str:
    """What ran, when it is not the spec asked for: ``→ ran tiny-clip (fallback, RANDOM)``; ``RANDOM`` alone for
    random weights asked for; "" otherwise (or without an entry)."""
    if not entry:
        return ""
    flags = [flag for flag, on in (("fallback", entry.get("fallback")), ("RANDOM", entry.get("random"))) if on]
    if entry.get("fallback") or entry.get("ran") != entry.get("requested"):
        return f"\u2192 ran {entry.get('ran')}" + (f" ({', '.join(flags)})" if flags else "")
    return "(RANDOM)" if entry.get("random") else ""


def entries(provenance: Mapping[str, Mapping[str, Any]] | None) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(role, spec, entry) of every model of a provenance mapping, CLIP-role models first."""
    for role in ROLES:
        for spec, entry in ((provenance or {}).get(role) or {}).items():
            yield role, spec, dict(entry)
