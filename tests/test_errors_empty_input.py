"""A stage whose input is empty says whether the stage before it never ran or ran and rejected everything."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest
from fixtures_ingest import make_config, write_images, write_lines

from clipaudit.io.tables import RunTables
from clipaudit.records import REJECTS, REJECTS_KEY, REJECTS_SCHEMA
from clipaudit.stages.daf import DafError, load_lists
from clipaudit.stages.embed import EmbedError, plan_images
from clipaudit.stages.ingest import run_ingest
from clipaudit.stages.upstream import empty_input_message


def _all_missing(tmp_path, n: int = 7):
    """A manifest of ``n`` bare file names next to an image folder it does not name: every row is missing."""
    write_images(tmp_path / "imgs", [f"{i}.jpg" for i in range(n)])
    manifest = write_lines(tmp_path / "m.csv", ["image,caption", *(f"{i}.jpg,caption {i}" for i in range(n))])
    return make_config(tmp_path / "run", format="manifest", captions=manifest)


def test_embed_after_ingest_rejected_everything_gives_counts_and_examples(tmp_path, caplog):
    config = _all_missing(tmp_path)
    tables = RunTables(config.run_dir)
    with caplog.at_level(logging.WARNING, logger="clipaudit.ingest"):
        stats = run_ingest(config, tables)
    assert stats.counts["samples"] == 0 and stats.counts["rejects"] == 7
    assert any("every input was rejected (missing_image 7)" in r.getMessage() for r in caplog.records)

    with pytest.raises(EmbedError) as caught:
        plan_images(tables, {})
    message = str(caught.value)
    assert "run the ingest stage first" not in message
    assert "the ingest stage ran and rejected 7 inputs (missing_image 7)" in message
    assert "line 2 of " in message and "line 4 of " in message and "line 5 of " not in message
    assert "'0.jpg' not found" in message and "stage = 'ingest'" in message


def test_with_dataset_images_the_same_manifest_ingests(tmp_path):
    config = _all_missing(tmp_path)
    config = make_config(config.run_dir, format="manifest", captions=config.dataset.captions,
                         images=tmp_path / "imgs")
    stats = run_ingest(config, RunTables(config.run_dir))
    assert stats.counts["samples"] == 7 and stats.counts["rejects"] == 0


def test_a_stage_that_never_ran_is_named(tmp_path):
    tables = RunTables(str(tmp_path / "fresh"))
    with pytest.raises(EmbedError, match="no samples in .*: the ingest stage has not run in this run_dir: "
                                         "run the ingest stage first"):
        plan_images(tables, {})
    with pytest.raises(DafError, match="the neighbours stage has not run in this run_dir"):
        load_lists(tables)


def test_counts_by_reason_most_frequent_first_and_other_stages_ignored(tmp_path):
    tables = RunTables(str(tmp_path))
    rows = [{"source": "s", "item": f"i{n}", "stage": "embed", "reason": reason, "detail": "d"}
            for n, reason in enumerate(["zero_bytes", "not_an_image", "not_an_image"])]
    rows.append({"source": "s", "item": "x", "stage": "ingest", "reason": "malformed", "detail": ""})
    tables.insert_new(REJECTS, pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), REJECTS_KEY, REJECTS_SCHEMA)
    message = empty_input_message(tables, "no vectors", "embed", "image_embeddings_clip", examples=1)
    assert message.startswith("no vectors: the embed stage ran and rejected 3 inputs (not_an_image 2, zero_bytes 1)")
    assert "first: i0 of s: zero_bytes (d)." in message and "malformed" not in message


def test_a_stage_that_ran_and_wrote_nothing_quotes_its_summary(tmp_path):
    tables = RunTables(str(tmp_path))
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "summarize.json").write_text(json.dumps(
        {"stage": "summarize", "notes": {"summary": "3 summarize requests planned; nothing sent"}}))
    message = empty_input_message(tables, "no failure_types table", "summarize", "failure_types")
    assert "the summarize stage ran but wrote nothing and rejected nothing" in message
    assert "its last run said: 3 summarize requests planned; nothing sent" in message
    assert "has not run" not in message
