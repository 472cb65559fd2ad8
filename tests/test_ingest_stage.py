"""Ingest stage: caption choice, duplicates, limit, and idempotent writes through RunTables."""

from __future__ import annotations

import logging

import pytest
from fixtures_ingest import make_config, write_image, write_images, write_lines

from clipaudit.io.tables import RunTables
from clipaudit.records import REJECTS, SAMPLES
from clipaudit.stages.ingest import choose_caption, run_ingest


@pytest.fixture
def corpus(tmp_path):
    """A token file over 4 images: one missing, one malformed line, and b.jpg a byte copy of a.jpg."""
    images = tmp_path / "images"
    write_images(images, ["a.jpg", "c.jpg", "d.jpg"])
    (images / "b.jpg").write_bytes((images / "a.jpg").read_bytes())
    captions = write_lines(tmp_path / "Flickr8k.token.txt", [
        "a.jpg#0\ta dog",
        "a.jpg#1\ta brown dog runs",
        "a.jpg#2\ta dog runs fast",
        "b.jpg#0\tthe same dog",
        "c.jpg#0\ta cat",
        "d.jpg#0\ta bird",
        "e.jpg#0\ta missing fish",
        "x.jpg.1#0\tmalformed",
    ])
    return tmp_path, captions, images


def _run(tmp_path, **dataset):
    config = make_config(tmp_path / "run", **dataset)
    return run_ingest(config, RunTables(config.run_dir)), RunTables(config.run_dir)


def test_caption_choice():
    assert choose_caption(["a dog", "a brown dog runs", "a dog runs fast"], "longest") == "a brown dog runs"
    assert choose_caption(["a dog", "a brown dog"], "first") == "a dog"
    with pytest.raises(ValueError):
        choose_caption([], "longest")


@pytest.mark.parametrize("choice, expected", [("longest", "a brown dog runs"), ("first", "a dog")])
def test_samples_rejects_and_caption_choice(corpus, choice, expected):
    tmp_path, captions, images = corpus
    stats, tables = _run(tmp_path, format="flickr8k", captions=captions, images=images, caption_choice=choice)
    samples = {row["image_id"]: row for row in tables.read(SAMPLES).to_pylist()}
    assert sorted(samples) == ["a", "c", "d"]
    assert samples["a"]["caption"] == expected
    assert samples["a"]["captions"] == ["a dog", "a brown dog runs", "a dog runs fast"]
    rejects = {(r["reason"], r["item"]) for r in tables.read(REJECTS).to_pylist()}
    assert rejects == {("missing_image", "e.jpg"), ("malformed", "line 8"), ("duplicate", "b")}
    counts = stats.counts
    assert counts["read"] == 6 and counts["read_samples"] == 4
    assert counts["samples"] == 3 and counts["rejects"] == 3
    assert counts["rejects.duplicate"] == counts["rejects.malformed"] == counts["rejects.missing_image"] == 1
    assert counts["new_samples"] == 3 and counts["new_rejects"] == 3
    assert counts["read"] == counts["samples"] + counts["rejects"] + counts["beyond_limit"]


def test_rerun_writes_nothing_new(corpus, caplog):
    tmp_path, captions, images = corpus
    _run(tmp_path, format="flickr8k", captions=captions, images=images)
    with caplog.at_level(logging.INFO, logger="clipaudit.ingest"):
        stats, tables = _run(tmp_path, format="flickr8k", captions=captions, images=images)
    assert stats.counts["new_samples"] == 0 and stats.counts["new_rejects"] == 0
    assert stats.counts["samples"] == 3
    assert tables.count(SAMPLES) == 3 and tables.count(REJECTS) == 3
    assert "0 new sample rows" in caplog.text


def test_limit_takes_the_first_ids(corpus):
    tmp_path, captions, images = corpus
    stats, tables = _run(tmp_path, format="flickr8k", captions=captions, images=images, limit=2)
    assert sorted(tables.read(SAMPLES).column("image_id").to_pylist()) == ["a", "c"]
    assert stats.counts["beyond_limit"] == 1
    assert stats.counts["read"] == stats.counts["samples"] + stats.counts["rejects"] + stats.counts["beyond_limit"]


def test_uri_check_keeps_byte_copies(corpus):
    tmp_path, captions, images = corpus
    stats, _ = _run(tmp_path, format="flickr8k", captions=captions, images=images, duplicate_check="uri")
    assert stats.counts["samples"] == 4 and "rejects.duplicate" not in stats.counts


def test_repeated_ids_and_uris_from_a_manifest(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg", 1)
    write_image(tmp_path / "imgs" / "b.jpg", 2)
    manifest = write_lines(tmp_path / "m.csv", [
        "image,caption",
        "imgs/a.jpg,first",
        "imgs/a.jpg,second",
        "./imgs/a.jpg,third",
        "imgs/b.jpg,other",
    ])
    stats, tables = _run(tmp_path, format="manifest", captions=manifest)
    samples = tables.read(SAMPLES).to_pylist()
    assert [(s["image_id"], s["caption"]) for s in samples] == [("imgs/a.jpg", "first"), ("imgs/b.jpg", "other")]
    duplicates = sorted(r["item"] for r in tables.read(REJECTS).to_pylist() if r["reason"] == "duplicate")
    assert duplicates == ["imgs/a.jpg", "imgs/a.jpg #2"]
    assert stats.counts["rejects.duplicate"] == 2


def test_synthetic_through_the_stage_prints_nothing(tmp_path, capsys):
    stats, tables = _run(tmp_path, format="synthetic", num_images=5)
    assert stats.counts["samples"] == 5 and stats.counts["rejects"] == 0
    assert tables.count(SAMPLES) == 5 and tables.count(REJECTS) == 0
    assert (tmp_path / "run" / "work" / "seed-0" / "00004.png").is_file()
    assert capsys.readouterr().out == ""
