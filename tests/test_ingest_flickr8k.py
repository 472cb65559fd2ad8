"""Flickr8k reader: both layouts, told from the content; malformed lines and missing images become rejects."""

from __future__ import annotations

import os

import pytest
from fixtures_ingest import by_reason, split, write_images, write_lines

from clipaudit.config import DatasetConfig
from clipaudit.io.readers import IngestError, read_corpus


def _read(captions, images):
    cfg = DatasetConfig(format="flickr8k", captions=str(captions), images=str(images))
    return split(read_corpus(cfg, "unused"))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, ["a.jpg", "b.jpg", "uncaptioned.jpg"])
    return folder


def test_token_layout_groups_orders_and_rejects(tmp_path, images):
    captions = write_lines(tmp_path / "Flickr8k.token.txt", [
        "a.jpg#1\ta dog runs .",              # 1
        "a.jpg#0\ta brown dog runs on grass .",  # 2
        "b.jpg#0\ta cat",                     # 3
        "gone.jpg#0\ta bird",                 # 4
        "gone.jpg#1\ta small bird",           # 5
        "b.jpg.1#0\tpeople waiting",          # 6: the original's malformed entry
        "no tab here",                        # 7
        "",                                   # 8: blank, ignored
        "b.jpg#1\t   ",                       # 9: empty caption
        "b.jpg#2 a cat on a mat",             # 10: space, not tab
        "nohash\ta caption",                  # 11
    ])
    samples, rejects = _read(captions, images)
    assert [s.image_id for s in samples] == ["a", "b"]
    a, b = samples
    assert a.captions == ["a brown dog runs on grass .", "a dog runs ."]
    assert a.uri == os.path.join(str(images), "a.jpg") and os.path.isabs(a.uri)
    assert a.source == str(captions)
    assert b.captions == ["a cat"]
    groups = by_reason(rejects)
    assert set(groups) == {"malformed", "missing_image"}
    assert sorted(r.item for r in groups["malformed"]) == ["line 10", "line 11", "line 6", "line 7", "line 9"]
    assert all(r.stage == "ingest" and r.source == str(captions) and r.detail for r in rejects)
    malformed_6 = next(r for r in groups["malformed"] if r.item == "line 6")
    assert "b.jpg.1" in malformed_6.detail
    [missing] = groups["missing_image"]
    assert missing.item == "gone.jpg"
    assert "4, 5" in missing.detail


def test_csv_layout_with_commas_and_quotes(tmp_path, images):
    captions = write_lines(tmp_path / "captions.txt", [
        "image,caption",
        'a.jpg,"A dog, a ball and a ""big"" stick ."',
        "a.jpg,A dog runs",
        "b.jpg,A cat, sitting",   # unquoted comma in the last column: kept
        "gone.jpg,a bird",
        "not-an-image,a caption",
        "b.jpg,",
    ])
    samples, rejects = _read(captions, images)
    assert {s.image_id: s.captions for s in samples} == {
        "a": ['A dog, a ball and a "big" stick .', "A dog runs"],
        "b": ["A cat, sitting"],
    }
    groups = by_reason(rejects)
    assert [r.item for r in groups["missing_image"]] == ["gone.jpg"]
    assert "line 5" in groups["missing_image"][0].detail
    assert sorted(r.item for r in groups["malformed"]) == ["line 6", "line 7"]


def test_layout_is_told_from_content_not_extension(tmp_path, images):
    token_named_csv = write_lines(tmp_path / "captions.csv", ["a.jpg#0\ta dog"])
    csv_named_txt = write_lines(tmp_path / "Flickr8k.token.txt", ["image,caption", "a.jpg,a dog"])
    for path in (token_named_csv, csv_named_txt):
        samples, rejects = _read(path, images)
        assert [(s.image_id, s.captions) for s in samples] == [("a", ["a dog"])]
        assert rejects == []


def test_csv_without_header(tmp_path, images):
    samples, rejects = _read(write_lines(tmp_path / "c.csv", ["a.jpg,a dog", "b.jpg,a cat"]), images)
    assert [s.image_id for s in samples] == ["a", "b"] and rejects == []


def test_unbalanced_quote_is_rejected_not_swallowed_silently(tmp_path, images):
    captions = write_lines(tmp_path / "c.csv", ["image,caption", 'a.jpg,"a dog', "b.jpg,a cat"])
    samples, rejects = _read(captions, images)
    assert samples == []
    [bad] = rejects
    assert bad.reason == "malformed" and bad.item == "line 2" and "lines 2-3" in bad.detail


def test_unknown_csv_header_is_an_error_naming_the_file(tmp_path, images):
    captions = write_lines(tmp_path / "c.csv", ["filename,text", "a.jpg,a dog"])
    with pytest.raises(IngestError, match="c.csv"):
        _read(captions, images)


def test_invalid_utf8_line_is_a_reject(tmp_path, images):
    path = tmp_path / "token.txt"
    path.write_bytes(b"a.jpg#0\ta dog\nb.jpg#0\ta \xff cat\nb.jpg#1\ta cat\n")
    samples, rejects = _read(path, images)
    assert {s.image_id: s.captions for s in samples} == {"a": ["a dog"], "b": ["a cat"]}
    assert [(r.item, r.reason) for r in rejects] == [("line 2", "malformed")]
