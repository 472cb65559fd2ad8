"""Probe scenes, their truth, and the packaged probe weights (no training here: see test_probe_training.py)."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest

from clipaudit.models import packaged
from clipaudit.models.errors import ModelSpecError, ModelUnavailableError
from clipaudit.models.registry import resolve_model
from clipaudit.probe.scenes import (
    ATTRIBUTES,
    POSITIONS,
    SceneSpec,
    ShapeGroup,
    corpus_spec,
    scene_spec,
    variant,
)
from clipaudit.probe.truth import (
    SCENE_ATTRIBUTES,
    chance_rates,
    differs_in,
    full,
    only_differs_in,
    pair_truth,
    parse_label,
    precision,
)

POSITION_WORDS = ("left", "right", "top", "bottom", "center")


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_variant_differs_from_its_scene_in_exactly_its_attribute(attribute):
    for index in range(150):
        spec = scene_spec(5, index)
        changed = variant(spec, attribute, random.Random(index))
        assert only_differs_in(spec, changed) == attribute, (spec, changed)
        assert differs_in(spec, changed, attribute)


def test_a_scene_with_every_position_taken_swaps_two_groups():
    looks = [("circle", "red", 1), ("square", "green", 2), ("triangle", "blue", 3), ("circle", "yellow", 4),
             ("square", "black", 3)]
    groups = tuple(ShapeGroup(kind, colour, position, count) for (kind, colour, count), position
                   in zip(looks, POSITIONS))
    spec = SceneSpec(groups)
    moved = variant(spec, "position", random.Random(0))
    assert sorted(g.position for g in moved.groups) == sorted(POSITIONS)
    assert only_differs_in(spec, moved) == "position" and differs_in(spec, moved, "position")


def test_captions_without_position_never_say_where_and_match_across_arrangements():
    for index in range(60):
        spec = scene_spec(2, index)
        moved = variant(spec, "position", random.Random(index))
        plain = spec.captions(omit=frozenset({"position"}))
        assert plain == moved.captions(omit=frozenset({"position"}))
        assert not any(word in caption.split() for caption in plain for word in POSITION_WORDS)
        assert any(word in " ".join(spec.captions()) for word in POSITION_WORDS)
    with pytest.raises(ValueError, match="cannot omit"):
        scene_spec(0, 0).captions(omit=frozenset({"colour"}))


def test_a_corpus_with_variants_is_drawn_scenes_each_followed_by_one_variant_per_attribute():
    specs = [corpus_spec(0, i, 4) for i in range(50)]
    for start in range(0, 50, 5):
        base = specs[start]
        assert base == scene_spec(0, start // 5)
        assert [only_differs_in(base, specs[start + v]) for v in range(1, 5)] == list(ATTRIBUTES)
    assert [corpus_spec(0, i) for i in range(10)] == [scene_spec(0, i) for i in range(10)]


def test_a_large_corpus_with_variants_never_runs_out_and_never_repeats_an_image():
    for seed in (0, 1):
        specs = [corpus_spec(seed, i, 4) for i in range(4500)]
        assert len({full(spec) for spec in specs}) == len(specs)


def test_chance_rates_match_counting_every_pair():
    specs = [corpus_spec(1, i, 4) for i in range(60)]
    pairs = list(itertools.combinations(specs, 2))
    for attribute in SCENE_ATTRIBUTES:
        rates = chance_rates(specs, attribute)
        only = sum(only_differs_in(a, b) == attribute for a, b in pairs) / len(pairs)
        differs = sum(differs_in(a, b, attribute) for a, b in pairs) / len(pairs)
        assert rates["only"] == pytest.approx(only) and rates["differs"] == pytest.approx(differs)
        assert rates["pairs"] == len(pairs)


def test_precision_counts_the_pairs_that_isolate_the_attribute():
    specs = {f"s{i}": corpus_spec(3, i, 4) for i in range(40)}
    position_pairs = [(f"s{b}", f"s{b + 4}") for b in range(0, 40, 5)]
    colour_pairs = [(f"s{b}", f"s{b + 2}") for b in range(0, 10, 5)]
    chance = chance_rates(specs.values(), "position")
    result = precision([*position_pairs, *colour_pairs, ("s0", "not-a-scene")], specs, "position", chance)
    assert result.pairs == 10
    assert result.only == pytest.approx(0.8)
    assert result.by_attribute == {"position": 8, "colour": 2}
    assert result.lift == pytest.approx(0.8 / chance["only"])
    truth = pair_truth(specs["s0"], specs["s4"])
    assert truth["only"] == "position" and truth["differs"] == ["position"]


def test_labels_parse_back_to_scenes_and_anything_else_is_none():
    spec = scene_spec(0, 3)
    assert parse_label(spec.to_json()) == spec
    assert parse_label("dog") is None and parse_label(None) is None and parse_label('{"a": 1}') is None


def test_short_token_text_features_equal_open_clips_full_context():
    import open_clip
    import torch

    from clipaudit.models import tiny
    from clipaudit.models.open_clip_backend import build
    from clipaudit.probe.train import encode_short_text

    model = build("tiny-clip", None).eval()
    tiny.register_open_clip_config()
    tokens = open_clip.get_tokenizer("tiny-clip")(["two red circles", "a blue square on a white background"])
    length = int((tokens != 0).sum(dim=1).max())
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        short = encode_short_text(model, tokens[:, :length])
    torch.testing.assert_close(short, full, rtol=0, atol=1e-6)


def test_weights_round_trip_storing_only_the_changed_token_rows(tmp_path):
    import torch
    from safetensors.torch import load_file

    from clipaudit.models.open_clip_backend import build

    initial = build("tiny-clip", None).state_dict()
    trained = build("tiny-clip", None)
    with torch.no_grad():
        trained.token_embedding.weight[[5, 320, 49406]] += 1.0
        trained.visual.proj.mul_(2.0)
    path = tmp_path / "probe-clip.safetensors"
    packaged.save_state(trained, initial, path)
    stored = load_file(str(path))
    assert stored["token_embedding.weight.rows"].tolist() == [5, 320, 49406]
    assert path.stat().st_size < 1_500_000
    fresh = build("tiny-clip", None)
    packaged.load_state(fresh, path)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_the_packaged_pair_is_in_the_package_hash_checked_and_small():
    card = packaged.read_card()
    assert card["hidden"] == "position"
    total = 0
    for name in packaged.PACKAGED:
        path = packaged.checked_path(name)
        total += path.stat().st_size
        assert card["files"][name]["sha256"] == packaged.file_sha256(path)
    assert total <= 5_000_000
    held_out = card["held_out"]["minimal_pair_similarity"]
    others = [held_out[a]["clip"] for a in ATTRIBUTES if a != "position"]
    assert held_out["position"]["clip"] > max(others)
    assert held_out["position"]["reference"] < held_out["position"]["clip"]


def test_probe_specs_resolve_to_trained_weights_and_a_changed_file_is_refused(tmp_path, monkeypatch):
    clip = resolve_model("probe-clip", "clip")
    assert not clip.is_random and clip.dim == 64
    reference = resolve_model("probe-dino", "reference")
    model = reference.load()
    vectors = model.encode_images(np.zeros((2, *reference.preprocess.output_shape), dtype=np.float32))
    assert vectors.shape == (2, 64) and np.isfinite(vectors).all()
    with pytest.raises(ModelSpecError, match="no text tower"):
        resolve_model("probe-dino", "clip")

    copy = tmp_path / "weights"
    shutil.copytree(packaged.weights_dir(), copy)
    card = json.loads((copy / packaged.CARD).read_text())
    card["files"]["probe-clip"]["sha256"] = "0" * 64
    (copy / packaged.CARD).write_text(json.dumps(card))
    monkeypatch.setenv(packaged.WEIGHTS_ENV, str(copy))
    with pytest.raises(ModelUnavailableError, match="SHA-256"):
        resolve_model("probe-clip", "clip")
    fallback = resolve_model("probe-clip", "clip", fallback="tiny")
    assert fallback.is_random and fallback.spec == "tiny-clip" and fallback.requested_spec == "probe-clip"
