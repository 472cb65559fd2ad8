"""WebDataset reader: img2dataset shards, keys without caption or image, corrupt and truncated shards."""

from __future__ import annotations

import json

import pytest
from fixtures_ingest import by_reason, image_bytes, split, write_tar

from clipaudit.config import DatasetConfig
from clipaudit.io import fs
from clipaudit.io.readers import IngestError, read_corpus
from clipaudit.io.readers.webdataset import split_key


def _read(images):
    return split(read_corpus(DatasetConfig(format="webdataset", images=str(images)), "unused"))


def _good_shard(path):
    return write_tar(path, {
        "000.jpg": image_bytes(1, "JPEG"),
        "000.txt": b"a dog on the beach",
        "000.json": json.dumps({"caption": "a dog on the beach", "url": "http://x"}).encode(),
        "001.png": image_bytes(2),
        "001.json": json.dumps({"caption": ["a cat", "a grey cat"]}).encode(),
        "002.jpg": image_bytes(3, "JPEG"),
        "002.json": json.dumps({"url": "http://y"}).encode(),
        "003.txt": b"a caption without image",
        "004.jpg": image_bytes(4, "JPEG"),
        "004.json": b"{broken",
    })


def test_folder_of_shards(tmp_path):
    shards = tmp_path / "shards"
    good = _good_shard(shards / "00000.tar")
    (shards / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    full = _good_shard(tmp_path / "full.tar").read_bytes()
    (shards / "00002.tar").write_bytes(full[: len(full) // 2])
    (shards / "00000.parquet").write_bytes(b"ignored")
    samples, rejects = _read(shards)
    got = {s.image_id: s for s in samples}
    assert sorted(got) == ["00000/000", "00000/001"]
    assert got["00000/000"].captions == ["a dog on the beach"]
    assert got["00000/001"].captions == ["a cat", "a grey cat"]
    assert got["00000/000"].uri == f"{good}::000.jpg"
    assert fs.read_bytes(got["00000/001"].uri) == image_bytes(2)
    groups = by_reason(rejects)
    assert [(r.source, r.item) for r in groups["no_caption"]] == [(str(good), "002")]
    assert [r.item for r in groups["missing_image"]] == ["003"]
    assert [r.item for r in groups["malformed"]] == ["004"]
    assert sorted(r.item for r in groups["corrupt_shard"]) == ["00001.tar", "00002.tar"]
    assert all(r.stage == "ingest" and r.detail for r in rejects)


def test_one_tar_and_an_empty_one(tmp_path):
    samples, _ = _read(_good_shard(tmp_path / "only.tar"))
    assert {s.image_id for s in samples} == {"only/000", "only/001"}
    samples, rejects = _read(write_tar(tmp_path / "empty.tar", {}))
    assert samples == [] and [r.reason for r in rejects] == ["empty_shard"]


def test_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(IngestError, match="no .tar shards"):
        _read(tmp_path / "none")


def test_keys_split_at_the_first_dot_of_the_file_name():
    assert split_key("dir/000.seg.png") == ("dir/000", "seg.png")
    assert split_key("000.jpg") == ("000", "jpg")


def test_bad_header_after_the_first_member_rejects_the_shard(tmp_path):
    good = write_tar(tmp_path / "a.tar", {"0.jpg": image_bytes(1), "0.txt": b"x", "1.jpg": image_bytes(2),
                                          "1.txt": b"y"})
    data = good.read_bytes()
    third_header = 2 * 1024
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "b.tar").write_bytes(data[:third_header] + b"garbage!" * 64 + data[third_header + 512:])
    samples, rejects = _read(tmp_path / "shards")
    assert samples == []
    assert [(r.reason, r.item) for r in rejects] == [("corrupt_shard", "b.tar")]
    assert "invalid tar header" in rejects[0].detail
