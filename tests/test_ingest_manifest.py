"""Manifest reader: CSV / JSONL / JSON / Parquet, path or URL, one or more caption columns, bad rows as rejects."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_ingest import by_reason, split, write_images, write_lines

from clipaudit.config import DatasetConfig
from clipaudit.io.readers import IngestError, read_corpus
from clipaudit.io.readers.manifest import image_id_for

URL = "https://example.com/img/1.jpg"


def _read(path, **kwargs):
    cfg = DatasetConfig(format="manifest", captions=str(path), **kwargs)
    return split(read_corpus(cfg, "unused"))


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpg", "b.png", "c.jpg"])
    return tmp_path


def test_csv_paths_urls_lists_and_bad_rows(folder):
    manifest = write_lines(folder / "m.csv", [
        "image,caption,alt",
        'imgs/a.jpg,a dog,"[""a brown dog"", ""a dog outside""]"',   # 2: JSON list in a cell
        "./imgs/b.png,a cat,",                                       # 3
        f"{URL},a remote bird,",                                     # 4: URL, not checked
        "imgs/missing.jpg,a ghost,",                                 # 5
        ",an empty image,",                                          # 6
        "imgs/c.jpg,,",                                              # 7: no caption
        "imgs/c.jpg,too,many,fields",                                # 8
        "imgs/c.jpg,[not json,",                                     # 9: kept as text
    ])
    samples, rejects = _read(manifest, caption_columns=["caption", "alt"])
    got = {s.image_id: s for s in samples}
    assert got["imgs/a.jpg"].captions == ["a dog", "a brown dog", "a dog outside"]
    assert got["imgs/a.jpg"].uri == os.path.join(str(folder), "imgs", "a.jpg")
    assert got["imgs/b.png"].captions == ["a cat"]
    assert got[image_id_for(URL)].uri == URL
    assert got["imgs/c.jpg"].captions == ["[not json"]
    assert len(samples) == 4
    groups = by_reason(rejects)
    assert [r.item for r in groups["missing_image"]] == ["line 5"]
    assert [r.item for r in groups["no_caption"]] == ["line 7"]
    assert sorted(r.item for r in groups["malformed"]) == ["line 6", "line 8"]
    assert all(r.source == str(manifest) and r.stage == "ingest" for r in rejects)


def test_url_ids_are_stable_short_and_distinct():
    first = image_id_for(URL)
    assert first == image_id_for(URL) and first.startswith("url-") and len(first) == 20
    assert first != image_id_for(URL + "?x=1")
    assert image_id_for("imgs/../imgs/a.jpg") == "imgs/a.jpg"


def test_jsonl_rows(folder):
    manifest = write_lines(folder / "m.jsonl", [
        json.dumps({"image": "imgs/a.jpg", "caption": ["one", "two", ""]}),
        "{not json",
        "[1, 2]",
        "",
        json.dumps({"image": "imgs/b.png", "caption": None}),
        json.dumps({"image": "imgs/c.jpg", "caption": 7}),
        json.dumps({"caption": "no image key"}),
        json.dumps({"image": "imgs/c.jpg", "caption": "a third"}),
    ])
    samples, rejects = _read(manifest)
    assert [(s.image_id, s.captions) for s in samples] == [("imgs/a.jpg", ["one", "two"]),
                                                           ("imgs/c.jpg", ["a third"])]
    assert {r.item: r.reason for r in rejects} == {
        "line 2": "malformed", "line 3": "malformed", "line 5": "no_caption", "line 6": "malformed",
        "line 7": "malformed",
    }


def test_json_array(folder):
    manifest = folder / "m.json"
    manifest.write_text(json.dumps([{"image": "imgs/a.jpg", "caption": "x"}, "oops"]))
    samples, rejects = _read(manifest)
    assert [s.image_id for s in samples] == ["imgs/a.jpg"]
    assert [(r.item, r.reason) for r in rejects] == [("item 2", "malformed")]


def test_parquet_with_list_column_and_id_column(folder):
    table = pa.table({
        "path": ["imgs/a.jpg", "imgs/b.png", None, "imgs/c.jpg"],
        "captions": [["a", "b"], [], ["c"], None],
        "key": ["k1", "k2", "k3", "k4"],
    })
    pq.write_table(table, folder / "m.parquet")
    samples, rejects = _read(folder / "m.parquet", image_column="path", caption_columns=["captions"],
                             id_column="key")
    assert [(s.image_id, s.captions) for s in samples] == [("k1", ["a", "b"])]
    assert {r.item: r.reason for r in rejects} == {"row 2": "no_caption", "row 3": "malformed",
                                                   "row 4": "no_caption"}


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m.parquet"])
def test_missing_column_is_an_error_naming_file_and_column(folder, name):
    path = folder / name
    if name.endswith(".csv"):
        write_lines(path, ["image,text", "imgs/a.jpg,x"])
    elif name.endswith(".jsonl"):
        write_lines(path, [json.dumps({"image": "imgs/a.jpg", "text": "x"})])
    else:
        pq.write_table(pa.table({"image": ["imgs/a.jpg"], "text": ["x"]}), path)
    with pytest.raises(IngestError) as error:
        _read(path)
    assert name in str(error.value) and "'caption'" in str(error.value)


def test_unknown_extension_is_an_error(folder):
    with pytest.raises(IngestError, match="m.xml"):
        _read(write_lines(folder / "m.xml", ["<x/>"]))


def test_dataset_images_is_the_base_folder_of_relative_paths(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("lists")
    manifest = write_lines(elsewhere / "m.csv", ["image,caption", "a.jpg,a dog", "missing.jpg,a ghost",
                                                  f"{folder / 'imgs' / 'b.png'},an absolute path"])
    samples, rejects = _read(manifest, images=str(folder / "imgs"))
    got = {s.image_id: s.uri for s in samples}
    assert got["a.jpg"] == os.path.join(str(folder), "imgs", "a.jpg")
    assert got[str(folder / "imgs" / "b.png")] == str(folder / "imgs" / "b.png")
    (missing,) = rejects
    assert missing.reason == "missing_image" and os.path.join(str(folder), "imgs", "missing.jpg") in missing.detail


def test_without_dataset_images_a_missing_image_says_where_paths_are_taken_from(folder):
    manifest = write_lines(folder / "m.csv", ["image,caption", "a.jpg,a dog"])
    _, (missing,) = _read(manifest)
    assert missing.reason == "missing_image"
    assert "relative paths are taken from the manifest's folder unless dataset.images" in missing.detail
