"""The daf stage end to end on a planted blind spot: a colour-blind CLIP against a colour-aware reference.

The corpus: families of synthetic scenes that differ only by colour (one layout in six colours, twelve
layouts), and control families (six layouts at one position, all black) that no model can tell apart by colour.
The colour-blind CLIP's neighbours of a planted scene are its colour variants; the reference's are other layouts
in the same colour. The DAF must find exactly the planted scenes, their colour variants as the CLIP-only
evidence, and the colour-variant pairs as CLIP-blind pairs.
"""

from __future__ import annotations

import json
import random
from itertools import combinations

import numpy as np
import pytest

from clipaudit.config import Config, DafConfig, EmbedConfig, ModelsConfig, NeighboursConfig
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline
from clipaudit.probe.scenes import KINDS, SceneSpec, ShapeGroup, render_scene
from clipaudit.records import (
    BLIND_PAIRS,
    DAF_CASES,
    IMAGE_EMBEDDINGS,
    SAMPLES,
    SAMPLES_SCHEMA,
    Sample,
    samples_to_table,
)
from clipaudit.runtime import LocalRunner
from clipaudit.stages.daf import DafError, run_daf
from clipaudit.stages.embed import run_embed
from clipaudit.stages.neighbours import run_neighbours

K = 5
PLANTED_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
LAYOUTS = [(kind, count) for count in (1, 2) for kind in KINDS]


PLANTED_MODELS = ModelsConfig(clip="python:planted_models:colour_blind", reference="python:planted_models:colour_aware")

def _specs() -> list[tuple[SceneSpec, str, bool]]:
    """(spec, layout key, planted) for every scene; backgrounds random (both models ignore them)."""
    rng = random.Random(0)
    scenes = []
    for position in ("left", "right"):
        for kind, count in LAYOUTS:
            for colour in PLANTED_COLOURS:
                spec = SceneSpec((ShapeGroup(kind, colour, position, count),), rng.choice(["white", "gray"]))
                scenes.append((spec, f"{position}/{kind}/{count}", True))
    for position in ("top", "bottom", "center"):
        for kind, count in LAYOUTS:
            spec = SceneSpec((ShapeGroup(kind, "black", position, count),), rng.choice(["white", "gray"]))
            scenes.append((spec, f"{position}/{kind}/{count}", False))
    rng.shuffle(scenes)
    return scenes


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The run with samples, embeddings (planted plug-ins) and k=5 neighbours; the truth per image_id."""
    from clipaudit.models import resolve_model

    root = tmp_path_factory.mktemp("planted")
    samples, truth = [], {}
    for index, (spec, layout_key, is_planted) in enumerate(_specs()):
        image_id = f"scene_{index:03d}"
        path = root / f"{image_id}.png"
        render_scene(spec).save(path)
        captions = spec.captions()
        samples.append(Sample(image_id=image_id, uri=str(path), captions=captions, caption=captions[0],
                              source="planted", label=spec.to_json()))
        truth[image_id] = (layout_key, is_planted)
    config = Config(run_dir=str(root / "run"), neighbours=NeighboursConfig(k=K), models=PLANTED_MODELS)
    tables = RunTables(config.run_dir)
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    models = {"clip": resolve_model(PLANTED_MODELS.clip, "clip"),
              "reference": resolve_model(PLANTED_MODELS.reference, "reference")}
    run_embed(tables, LocalRunner(), models, EmbedConfig(batch_size=32, text_batch_size=256))
    run_neighbours(config, tables)
    return config, tables, truth


def _with_daf(config: Config, **daf) -> Config:
    return Config(run_dir=config.run_dir, neighbours=config.neighbours, daf=DafConfig(**daf), models=config.models)


def _precision_recall(found: set[str], expected: set[str]) -> tuple[float, float]:
    hits = len(found & expected)
    return hits / max(len(found), 1), hits / max(len(expected), 1)


def _cases(tables: RunTables) -> list[dict]:
    return tables.read(DAF_CASES).to_pylist()


def test_the_planted_colour_blind_scenes_are_the_daf_cases(planted):
    config, tables, truth = planted
    stats = run_daf(_with_daf(config, max_overlap=0.4), tables)
    cases = _cases(tables)
    expected = {image_id for image_id, (_, is_planted) in truth.items() if is_planted}
    precision, recall = _precision_recall({case["image_id"] for case in cases}, expected)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)

    captions = dict(zip(tables.read(SAMPLES).column("image_id").to_pylist(),
                        tables.read(SAMPLES).column("caption").to_pylist()))
    colour_only = [truth[n][0] == truth[case["image_id"]][0] for case in cases for n in case["clip_only"]]
    assert np.mean(colour_only) >= 0.9
    for case in cases:
        assert case["captions"] == [captions[case["image_id"]]] + [captions[n] for n in case["clip_only"]]
        assert case["caption"] == captions[case["image_id"]]
        assert set(case["clip_only"]) == set(case["clip_ids"]) - set(case["reference_ids"])
        assert set(case["reference_only"]) == set(case["reference_ids"]) - set(case["clip_ids"])
        assert case["overlap"] <= 0.4 and case["score"] == pytest.approx(1 - case["rbo"], abs=1e-6)
    assert [case["rank"] for case in cases] == sorted(case["rank"] for case in cases)

    notes = stats.notes
    assert notes["chance_overlap"] == pytest.approx(K / (len(truth) - 1))
    assert notes["mean_overlap"] > 3 * notes["chance_overlap"]
    assert notes["null"]["corpus_p_value"] < 0.05
    assert sum(notes["overlap_histogram"].values()) == len(truth)
    assert stats.counts["cases"] == len(cases)


def test_top_n_rule_picks_the_most_divergent(planted):
    config, tables, truth = planted
    expected = {image_id for image_id, (_, is_planted) in truth.items() if is_planted}
    run_daf(_with_daf(config, max_overlap=None, top_n=len(expected)), tables)
    cases = _cases(tables)
    assert len(cases) == len(expected)
    precision, recall = _precision_recall({case["image_id"] for case in cases}, expected)
    assert precision >= 0.9 and recall >= 0.9
    assert [case["rank"] for case in cases] == list(range(1, len(cases) + 1))


def _twin_pairs(truth: dict[str, tuple[str, bool]]) -> set[tuple[str, str]]:
    families: dict[str, list[str]] = {}
    for image_id, (layout_key, is_planted) in truth.items():
        if is_planted:
            families.setdefault(layout_key, []).append(image_id)
    return {tuple(sorted(pair)) for members in families.values() for pair in combinations(members, 2)}


def _reference_vectors(tables: RunTables) -> dict[str, np.ndarray]:
    table = tables.read(IMAGE_EMBEDDINGS["reference"])
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(table.column("image_id").to_pylist(),
                                                                 table.column("vector").to_pylist())}


def test_clip_blind_pairs_are_the_colour_variants(planted):
    config, tables, truth = planted
    stats = run_daf(_with_daf(config), tables)
    rows = tables.read(BLIND_PAIRS).to_pylist()
    pairs = {(row["image_a"], row["image_b"]) for row in rows}
    assert len(pairs) == len(rows) and all(a < b for a, b in pairs)
    precision, recall = _precision_recall(pairs, _twin_pairs(truth))
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    reference = _reference_vectors(tables)
    for row in rows:
        assert row["clip_sim"] >= 0.95 and row["reference_sim"] <= 0.6 and row["rule"] == "absolute"
        assert row["reference_sim"] == pytest.approx(float(reference[row["image_a"]] @ reference[row["image_b"]]),
                                                     abs=1e-5)
    assert stats.counts["blind_pairs"] == len(rows)


def test_quantile_rule_uses_thresholds_from_the_neighbour_pairs(planted):
    config, tables, _ = planted
    stats = run_daf(_with_daf(config, blind_rule="quantile", blind_clip_quantile=0.2,
                              blind_reference_quantile=0.8), tables)
    rows = tables.read(BLIND_PAIRS).to_pylist()
    used = stats.notes["blind_pairs"]
    assert used["rule"] == "quantile" and rows
    assert all(row["clip_sim"] >= used["clip_min"] and row["reference_sim"] <= used["reference_max"]
               for row in rows)
    assert {row["rule"] for row in rows} == {"quantile"}


def test_pipeline_writes_the_corpus_figures_and_reruns_without_duplicates(planted):
    config, tables, _ = planted
    config = _with_daf(config, max_overlap=0.4)
    first = run_pipeline(config, ["neighbours", "daf"])
    counts = {name: tables.count(name) for name in (DAF_CASES, BLIND_PAIRS)}
    second = run_pipeline(config, ["neighbours", "daf"])
    assert first["neighbours"].notes["reused"] and second["neighbours"].notes["reused"]
    assert {name: tables.count(name) for name in (DAF_CASES, BLIND_PAIRS)} == counts
    with open(f"{config.run_dir}/stats/daf.json") as handle:
        written = json.load(handle)
    for key in ("mean_overlap", "overlap_histogram", "chance_overlap", "chance_rbo", "null", "mean_rbo"):
        assert key in written["notes"]
    assert written["counts"]["cases"] == counts[DAF_CASES]


def test_daf_without_neighbours_says_what_to_run(tmp_path):
    with pytest.raises(DafError, match="run the neighbours stage first"):
        run_daf(Config(run_dir=str(tmp_path)), RunTables(str(tmp_path)))
