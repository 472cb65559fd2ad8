"""What a stage reads from upstream: the run's tables as one CLIP-role model sees them (:func:`model_view`), and
why a stage's input is empty: the stage that feeds it never ran here, or it ran and kept nothing.

Every stage that finds its input table missing or empty raises its own error with the message of
:func:`empty_input_message`, which tells the cases apart from what the run directory holds:

* the producing stage never ran (no output table, no rejects, no ``stats/<stage>.json``): ``... the ingest stage
  has not run in this run_dir: run the ingest stage first``;
* it ran and rejected its inputs: how many, the counts by reason and the first rejects, and where the rest are;
* it ran and had nothing to read: says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.records import REJECTS

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import ModelTables, RunTables

EXAMPLES = 3
"""Rejects quoted in the message."""
_DETAIL_WIDTH = 160


def empty_input_message(tables: RunTables, missing: str, producer: str, output: str | None = None,
                        examples: int = EXAMPLES) -> str:
    """``missing`` (what the caller did not find, e.g. ``no samples in RUN/lancedb``) followed by why.

    ``producer`` is the stage whose output is missing; ``output`` the table it writes (its existence, even
    empty, shows that the stage ran). The stage ran when that table exists, when the ``rejects`` table holds
    rows of that stage, or when ``stats/<producer>.json`` exists.
    """
    rows = tables.read(REJECTS, ["source", "item", "reason", "detail"], where=f"stage = '{producer}'")
    rejects = rows.to_pylist() if rows is not None else []
    stats = _stats(tables, producer)
    ran = bool(rejects) or (output is not None and tables.exists(output)) or stats is not None
    if not ran:
        return f"{missing}: the {producer} stage has not run in this run_dir: run the {producer} stage first"
    if not rejects:
        said = (stats or {}).get("notes", {}).get("summary")
        return (f"{missing}: the {producer} stage ran but wrote nothing and rejected nothing"
                + (f" (its last run said: {said})" if said else "")
                + f"; check its input and re-run the {producer} stage")
    counts = reason_counts(str(r["reason"]) for r in rejects)
    first = "; ".join(_example(r) for r in rejects[:examples])
    return (f"{missing}: the {producer} stage ran and rejected {len(rejects)} inputs ({counts}); "
            f"first: {first}. "
            f"Every reject is a row of the {REJECTS} table (stage = '{producer}'); fix the input or the config "
            f"and re-run the {producer} stage")


def reason_counts(reasons: Iterable[str]) -> str:
    """``missing_image 358, malformed 1``: counts of reject reasons, most frequent first."""
    counts = Counter(reasons)
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _example(reject: dict) -> str:
    detail = str(reject.get("detail") or "")
    if len(detail) > _DETAIL_WIDTH:
        detail = detail[: _DETAIL_WIDTH - 3] + "..."
    return f"{reject['item']} of {reject['source']}: {reject['reason']}" + (f" ({detail})" if detail else "")


def _stats(tables: RunTables, stage: str) -> dict | None:
    """``stats/<stage>.json`` (written after each stage that finished), or None."""
    path = fs.join(tables.run_dir, "stats", f"{stage}.json")
    if not fs.exists(path):
        return None
    try:
        stats = fs.read_json(path)
    except ValueError:
        return {}
    return stats if isinstance(stats, dict) else {}


def model_view(tables: RunTables | ModelTables, config: Config) -> ModelTables:
    """The run's tables as the audit of ``config``'s one CLIP-role model sees them (a per-model stage runs with
    ``config.for_clip_model(spec)``); ClipauditError when ``models.clip`` still lists several."""
    specs = config.models.clip_models
    if len(specs) != 1:
        raise ClipauditError(f"this stage audits one CLIP-role model at a time, but models.clip lists {len(specs)}: "
                             "run it through the pipeline, or with config.for_clip_model(spec)")
    return tables.for_clip_model(specs[0])
