"""The tcac stage's image-level accounting (images in = scored + rejected) and its one summary line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.records import REJECTS, SAMPLES, TCAC_CASES, StageStats
from clipaudit.stages.tcac.plan import STAGE

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables


def account(tables: RunTables, stats: StageStats) -> list[dict[str, Any]]:
    """Image-level accounting into ``stats.counts``: ``images_in`` (samples the embed stage did not reject),
    ``images_scored`` (with rows in ``tcac_cases``), ``images_rejected`` (a ``rejects`` row of this stage); returns
    those rejects (item, reason, detail)."""
    samples = set(tables.read(SAMPLES, ["image_id"]).column("image_id").to_pylist())
    rejects = tables.read(REJECTS, ["item", "stage", "reason", "detail"],
                          where=f"stage = 'embed' OR stage = '{STAGE}'")
    rows = rejects.to_pylist() if rejects is not None else []
    eligible = samples - {r["item"] for r in rows if r["stage"] == "embed"}
    mine = sorted((r for r in rows if r["stage"] == STAGE and r["item"] in eligible), key=lambda r: r["item"])
    cases = tables.read(TCAC_CASES, ["image_id"])
    scored = eligible & set(cases.column("image_id").to_pylist()) if cases is not None else set()
    stats.counts.update(images_in=len(eligible), images_scored=len(scored), images_rejected=len(mine))
    return mine


def summary_line(stats: StageStats, summary: pa.Table | None) -> str:
    """One line: images in = scored + rejected, what this run did, text encodings against unique captions, and mean
    changed per transform."""
    c = stats.counts
    done = (f"{c.get('pairs_written', 0)} new (image, transform) rows of {c.get('pairs_todo', 0)} to do"
            if c.get("pairs_todo") else "nothing left to do, no new rows")
    n_in, scored, rejected = (c.get(k, 0) for k in ("images_in", "images_scored", "images_rejected"))
    line = f"tcac: {n_in} in = {scored} scored + {rejected} rejected"
    if n_in - scored - rejected:
        line += f" + {n_in - scored - rejected} not scored (no caption to build a pool from, or not run yet)"
    line += (f"; {done}; {c.get('total_pairs', 0)} rows, {c.get('total_cases', 0)} cases "
             f"({c.get('total_daf_cases', 0)} images of them also DAF cases)")
    if "unique_captions" in c:
        line += f"; text encodings {c['text_encodings']} for {c['unique_captions']} unique captions"
    if summary is not None and summary.num_rows:
        means = ", ".join(f"{t} {m:.2f}" for t, m in zip(summary.column("transform").to_pylist(),
                                                         summary.column("mean_changed").to_pylist()))
        line += f"; mean changed: {means}"
    return line
