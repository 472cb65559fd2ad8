"""ImageFolder reader: class folders, captions from templates, readable class names, stray files as rejects."""

from __future__ import annotations

import json

import pytest
from fixtures_ingest import by_reason, split, write_image, write_lines

from clipaudit.config import DatasetConfig
from clipaudit.io.readers import IngestError, read_corpus
from clipaudit.io.readers.imagefolder import load_class_names


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "train"
    write_image(root / "n01440764" / "a.JPEG", 1)
    write_image(root / "n01440764" / "b.png", 2)
    write_image(root / "n02102040" / "sub" / "c.jpg", 3)
    write_image(root / "n09999999" / "d.jpg", 4)
    write_lines(root / "n02102040" / "notes.txt", ["not an image"])
    write_image(root / "stray.jpg", 5)
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def _read(root, **kwargs):
    cfg = DatasetConfig(format="imagefolder", images=str(root), **kwargs)
    return split(read_corpus(cfg, "unused"))


def test_synset_mapping_templates_and_rejects(tmp_path, root):
    mapping = write_lines(tmp_path / "LOC_synset_mapping.txt",
                          ["n01440764 tench, Tinca tinca", "n02102040 English springer, English springer spaniel"])
    samples, rejects = _read(root, class_names=str(mapping),
                             templates=["a photo of a {label}.", "a drawing of a {label}."])
    got = {s.image_id: s for s in samples}
    assert sorted(got) == ["n01440764/a", "n01440764/b", "n02102040/sub/c", "n09999999/d"]
    assert got["n01440764/a"].label == "tench"
    assert got["n01440764/a"].captions == ["a photo of a tench.", "a drawing of a tench."]
    assert got["n02102040/sub/c"].label == "English springer"
    assert got["n09999999/d"].label == "n09999999"
    assert got["n01440764/b"].uri == str(root / "n01440764" / "b.png")
    groups = by_reason(rejects)
    assert [r.item for r in groups["not_an_image_file"]] == ["n02102040/notes.txt"]
    assert [r.item for r in groups["not_in_class_folder"]] == ["stray.jpg"]
    assert len(rejects) == 2


@pytest.mark.parametrize("content", [
    {"n01440764": "tench", "n02102040": "springer"},
    {"0": ["n01440764", "tench"], "1": ["n02102040", "springer"]},
])
def test_json_class_names(tmp_path, content):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(content))
    assert load_class_names(str(path)) == {"n01440764": "tench", "n02102040": "springer"}


def test_without_class_names_the_folder_is_the_label(root):
    samples, _ = _read(root)
    assert {s.label for s in samples} == {"n01440764", "n02102040", "n09999999"}
    assert samples[0].captions == [f"a photo of a {samples[0].label}."]


def test_bad_template_and_bad_mapping_are_errors(tmp_path, root):
    with pytest.raises(IngestError, match="templates"):
        _read(root, templates=["a photo of a {name}."])
    bad = write_lines(tmp_path / "names.txt", ["n01440764"])
    with pytest.raises(IngestError, match="names.txt: line 1"):
        _read(root, class_names=str(bad))
