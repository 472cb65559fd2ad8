"""Synthetic probe corpus: deterministic scenes of counted, coloured, placed shapes with matching captions."""

from __future__ import annotations

import json

import pytest
from fixtures_ingest import split

from clipaudit.config import DatasetConfig
from clipaudit.io.readers import read_corpus
from clipaudit.probe.scenes import (
    COLOURS,
    SceneSpec,
    ShapeGroup,
    make_scene,
    render_scene,
)


def test_scenes_are_deterministic_and_distinct():
    image, spec = make_scene(3, 7)
    again, spec_again = make_scene(3, 7)
    assert spec == spec_again and image.tobytes() == again.tobytes()
    assert image.size == (224, 224) and image.mode == "RGB"
    specs = [make_scene(0, i)[1] for i in range(150)]
    assert len({s.to_json() for s in specs}) == 150
    assert all(1 <= s.total <= 4 for s in specs)
    assert {len(s.groups) for s in specs} == {1, 2, 3}


def test_captions_state_counts_colours_and_positions():
    spec = SceneSpec(groups=(ShapeGroup("circle", "red", "left", 2), ShapeGroup("square", "blue", "right", 1)))
    captions = spec.captions()
    assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
    assert captions[0] == "two red circles on the left and a blue square on the right"
    assert any("three shapes" in c for c in captions)
    assert any("one blue square" in c for c in captions)
    assert all("red" in c and "blue" in c for c in captions)


def test_render_two_scenes_that_differ_only_by_colour():
    red = SceneSpec(groups=(ShapeGroup("square", "red", "center", 1),))
    blue = SceneSpec(groups=(ShapeGroup("square", "blue", "center", 1),))
    red_image, blue_image = render_scene(red), render_scene(blue)
    assert red_image.getpixel((112, 112)) == COLOURS["red"]
    assert blue_image.getpixel((112, 112)) == COLOURS["blue"]
    assert red_image.getpixel((5, 5)) == blue_image.getpixel((5, 5)) == (255, 255, 255)
    left = render_scene(SceneSpec(groups=(ShapeGroup("square", "red", "left", 1),)))
    assert left.getpixel((37, 112)) == COLOURS["red"] and left.getpixel((112, 112)) == (255, 255, 255)


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="colour"):
        ShapeGroup("circle", "magenta", "left")
    with pytest.raises(ValueError, match="count"):
        ShapeGroup("circle", "red", "left", 5)
    with pytest.raises(ValueError, match="distinct positions"):
        SceneSpec(groups=(ShapeGroup("circle", "red", "left"), ShapeGroup("square", "blue", "left")))


def test_reader_writes_images_once_with_labels(tmp_path):
    cfg = DatasetConfig(format="synthetic", num_images=6, seed=1)
    samples, rejects = split(read_corpus(cfg, str(tmp_path)))
    assert rejects == [] and len(samples) == 6
    first = samples[0]
    assert first.image_id == "scene_1_00000"
    assert first.uri == str(tmp_path / "seed-1" / "00000.png")
    spec = SceneSpec.from_dict(json.loads(first.label))
    assert spec == make_scene(1, 0)[1] and first.captions == spec.captions()
    mtime = (tmp_path / "seed-1" / "00000.png").stat().st_mtime_ns
    samples_again, _ = split(read_corpus(cfg, str(tmp_path)))
    assert samples_again == samples
    assert (tmp_path / "seed-1" / "00000.png").stat().st_mtime_ns == mtime
