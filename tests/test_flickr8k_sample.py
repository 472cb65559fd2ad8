"""The shared real Flickr8k sample (300 images, all 40,460 caption lines), both layouts, through the stage.

Opt-in data: the folder comes from $CLIPAUDIT_FLICKR8K, by default ``../shared/data/flickr8k`` beside the
repository; the tests skip, saying so, where it is absent. Expected counts are computed from the files.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
from fixtures_ingest import make_config

from clipaudit.io.tables import RunTables
from clipaudit.records import REJECTS, SAMPLES
from clipaudit.stages.ingest import run_ingest

pytestmark = pytest.mark.flickr8k

ROOT = Path(os.environ.get("CLIPAUDIT_FLICKR8K", Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k"))
TOKEN = ROOT / "Flickr8k.token.txt"
CSV = ROOT / "captions.txt"
IMAGES = ROOT / "images"
WELL_FORMED = re.compile(r"^([^\t#]+\.jpg)#\d+\t\S")


@pytest.fixture(scope="module")
def present() -> set[str]:
    if not (TOKEN.is_file() and CSV.is_file() and IMAGES.is_dir()):
        pytest.skip(f"the Flickr8k sample is not at {ROOT} (set CLIPAUDIT_FLICKR8K to its folder)")
    return {p.name for p in IMAGES.iterdir() if p.suffix == ".jpg"}


def _expected_token(present: set[str]) -> tuple[set[str], int, set[str]]:
    """(captioned images present, malformed lines, captioned images absent), computed from the token file."""
    captioned: set[str] = set()
    malformed = 0
    for line in TOKEN.read_text(encoding="utf-8").splitlines():
        match = WELL_FORMED.match(line)
        if match:
            captioned.add(match.group(1))
        elif line.strip():
            malformed += 1
    return captioned & present, malformed, captioned - present


def _run(tmp_path, captions):
    config = make_config(tmp_path / "run", format="flickr8k", captions=captions, images=IMAGES)
    tables = RunTables(config.run_dir)
    return run_ingest(config, tables), tables


def test_token_file(tmp_path, present):
    found, malformed, missing = _expected_token(present)
    assert len(found) == 300 and malformed >= 1
    stats, tables = _run(tmp_path, TOKEN)
    samples = tables.read(SAMPLES).to_pylist()
    assert {s["image_id"] + ".jpg" for s in samples} == found
    assert all(len(s["captions"]) == 5 and s["caption"] == max(s["captions"], key=len) for s in samples)
    rejects = tables.read(REJECTS).to_pylist()
    assert {r["item"] for r in rejects if r["reason"] == "missing_image"} == missing
    bad = [r for r in rejects if r["reason"] == "malformed"]
    assert len(bad) == malformed
    assert any("2258277193_586949ec62.jpg.1" in r["detail"] and r["item"].startswith("line ") for r in bad)
    assert stats.counts["samples"] == 300
    assert stats.counts["rejects"] == len(missing) + malformed == len(rejects)
    rerun, _ = _run(tmp_path, TOKEN)
    assert rerun.counts["new_samples"] == 0 and rerun.counts["new_rejects"] == 0


def test_csv_layout_agrees(tmp_path, present):
    with CSV.open(newline="", encoding="utf-8") as handle:
        captioned = {row["image"] for row in csv.DictReader(handle)}
    stats, tables = _run(tmp_path, CSV)
    assert stats.counts["samples"] == len(captioned & present) == 300
    assert stats.counts["rejects"] == stats.counts["rejects.missing_image"] == len(captioned - present)
    _, token_tables = _run(tmp_path / "token", TOKEN)
    by_layout = [{r["image_id"]: r["captions"] for r in t.read(SAMPLES).to_pylist()} for t in (tables, token_tables)]
    assert by_layout[0] == by_layout[1]


def test_ingest_and_embed_give_the_documented_counts_and_rerun_writes_nothing(tmp_path, present):
    from clipaudit.config import EmbedConfig
    from clipaudit.models import resolve_model
    from clipaudit.records import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS
    from clipaudit.runtime import LocalRunner
    from clipaudit.stages.embed import run_embed

    found, malformed, missing = _expected_token(present)
    _, tables = _run(tmp_path, TOKEN)
    models = {"clip": resolve_model("tiny-clip", "clip"), "reference": resolve_model("tiny-dino", "reference")}
    embed = EmbedConfig(batch_size=64, text_batch_size=512)
    stats = run_embed(tables, LocalRunner(), models, embed)
    assert stats.counts["total_in"] == stats.counts["total_embedded"] == len(found)
    assert tables.count(IMAGE_EMBEDDINGS["clip"]) + tables.count(IMAGE_EMBEDDINGS["reference"]) == 2 * len(found)
    assert tables.count(CAPTION_EMBEDDINGS) == 5 * len(found)
    reasons = tables.read(REJECTS).column("reason").to_pylist()
    assert reasons.count("malformed") == malformed and reasons.count("missing_image") == len(missing)
    before = {name: tables.count(name) for name in tables.names()}
    again = run_embed(tables, LocalRunner(), models, embed)
    assert again.counts["images_todo"] == again.counts["captions_todo"] == 0
    assert {name: tables.count(name) for name in tables.names()} == before
