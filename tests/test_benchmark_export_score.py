"""Audit -> export -> score on a planted blind spot: a colour-blind CLIP audited against a colour-aware reference
on generated scenes (families that differ only by colour, and all-black controls), exported as a benchmark and
scored; the colour-blind model must fail the colour pairs and a colour-aware aligned model pass them."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipaudit.benchmark.collect import caption_signature
from clipaudit.benchmark.export import export_benchmark
from clipaudit.benchmark.format import FORMAT_VERSION, BenchmarkError
from clipaudit.benchmark.score import score_benchmark
from clipaudit.cli import main
from clipaudit.config import Config, DafConfig, EmbedConfig, ModelsConfig, NeighboursConfig, TcacConfig
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import write_resolved_config
from clipaudit.probe.scenes import KINDS, SceneSpec, ShapeGroup, render_scene
from clipaudit.records import (
    BLIND_PAIRS,
    BLIND_PAIRS_SCHEMA,
    FAILURE_CHECKS,
    FAILURE_CHECKS_SCHEMA,
    SAMPLES,
    SAMPLES_SCHEMA,
    Sample,
    samples_to_table,
)
from clipaudit.runtime import LocalRunner
from clipaudit.stages.daf import run_daf
from clipaudit.stages.embed import run_embed
from clipaudit.stages.neighbours import run_neighbours
from clipaudit.stages.tcac import run_tcac

BLIND_SPEC = "python:planted_models:colour_blind"
ALIGNED_SPEC = "python:test_benchmark_models:colour_aligned"
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
LAYOUTS = [(kind, count) for count in (1, 2) for kind in KINDS]
TEXT_PAIRS = [["a red circle on the left", "a green circle on the left"],
              ["two blue squares on the right", "two yellow squares on the right"]]


def _scenes() -> list[SceneSpec]:
    rng = random.Random(0)
    scenes = [SceneSpec((ShapeGroup(kind, colour, position, count),), rng.choice(["white", "gray"]))
              for position in ("left", "right") for kind, count in LAYOUTS for colour in COLOURS]
    scenes += [SceneSpec((ShapeGroup(kind, "black", position, count),), rng.choice(["white", "gray"]))
               for position in ("top", "bottom", "center") for kind, count in LAYOUTS]
    rng.shuffle(scenes)
    return scenes


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A run through embed, neighbours, daf and tcac with the planted models, a validated failure type, and one
    blind pair whose captions are identical; returns (run_dir, layout key per image_id)."""
    from clipaudit.models import resolve_model

    root = tmp_path_factory.mktemp("bench")
    samples, layout = [], {}
    for index, spec in enumerate(_scenes()):
        image_id = f"scene_{index:03d}"
        render_scene(spec).save(root / f"{image_id}.png")
        captions = spec.captions()
        samples.append(Sample(image_id, str(root / f"{image_id}.png"), captions, captions[0], "planted",
                              spec.to_json()))
        group = spec.groups[0]
        layout[image_id] = (group.kind, group.count, group.position)
    config = Config(run_dir=str(root / "run"), neighbours=NeighboursConfig(k=5), daf=DafConfig(max_overlap=0.4),
                    tcac=TcacConfig(transforms=["grayscale", "hflip"], cases_per_transform=8),
                    embed=EmbedConfig(batch_size=32, text_batch_size=256),
                    models=ModelsConfig(clip=BLIND_SPEC, reference="python:planted_models:colour_aware"))
    write_resolved_config(config)
    tables = RunTables(config.run_dir)
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    models = {"clip": resolve_model(BLIND_SPEC, "clip"),
              "reference": resolve_model("python:planted_models:colour_aware", "reference")}
    run_embed(tables, LocalRunner(), models, config.embed)
    run_neighbours(config, tables)
    run_daf(config, tables)
    run_tcac(config, tables, LocalRunner(), models["clip"])
    twin = samples[0]
    tables.insert_new(SAMPLES, samples_to_table([Sample("twin", twin.uri, twin.captions, twin.caption, "planted")]),
                      "image_id", SAMPLES_SCHEMA)
    audit = tables.for_clip_model(BLIND_SPEC)
    audit.insert_new(BLIND_PAIRS, pa.Table.from_pylist([{"image_a": twin.image_id, "image_b": "twin",
                                                         "clip_sim": 1.0, "reference_sim": 0.5, "gap": 0.5,
                                                         "rule": "absolute"}], schema=BLIND_PAIRS_SCHEMA),
                     ["image_a", "image_b"], BLIND_PAIRS_SCHEMA)
    audit.replace(FAILURE_CHECKS, pa.Table.from_pylist([{
        "name": "colour binding", "method": "DAF", "description": "colours are not encoded",
        "pairs": json.dumps(TEXT_PAIRS), "n_pairs": 2, "sims": [0.95, 0.95], "success_rate": 1.0,
        "mean_sim": 0.95, "threshold": 0.8, "threshold_mode": "absolute", "model": BLIND_SPEC, "request_id": "r",
        "status": "ok"}], schema=FAILURE_CHECKS_SCHEMA), FAILURE_CHECKS_SCHEMA)
    return config.run_dir, layout


def _colour_only(pairs: list[dict], layout: dict) -> np.ndarray:
    return np.array([layout[p["image_a"]] == layout[p["image_b"]] for p in pairs], dtype=bool)


def assert_clip_benchmark_builds(results: Path, scores: dict) -> None:
    """``clip_benchmark build`` (the clip-benchmark package's own CLI) reads the result files into one CSV row per
    (model, task) with our figures."""
    csv_path = results.parent / "benchmark.csv"
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "clip_benchmark"), "build", str(results),
                           "--output", str(csv_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4
    assert {row["task"] for row in rows} == {"clipaudit_pairs", "clipaudit_invariance", "clipaudit_text_pairs",
                                             "clipaudit_severity"}
    for spec in (BLIND_SPEC, ALIGNED_SPEC):
        row = next(r for r in rows if r["task"] == "clipaudit_pairs" and r["model"] == spec)
        assert row["pretrained"] == "clipaudit" and row["language"] == "en"
        assert float(row["pair_accuracy"]) == pytest.approx(scores[spec]["pair_accuracy"]["value"])
        invariance = next(r for r in rows if r["task"] == "clipaudit_invariance" and r["model"] == spec)
        assert float(invariance["invariance_hflip"]) == pytest.approx(scores[spec]["invariance"]["hflip"]["value"])
        severity = next(r for r in rows if r["task"] == "clipaudit_severity" and r["model"] == spec)
        assert float(severity["pair_accuracy_gaussian_blur_5"]) == pytest.approx(
            scores[spec]["pair_accuracy_by_severity"]["gaussian_blur"]["5"]["value"])


def test_export_then_score_separates_the_colour_blind_model_from_an_aligned_one(audited, tmp_path, capsys):
    run_dir, layout = audited
    bench = str(tmp_path / "bench")
    manifest = export_benchmark(run_dir, bench)
    pairs = pq.read_table(os.path.join(bench, "pairs.parquet")).to_pylist()
    assert pairs and manifest["counts"]["pairs_left_out"] == {"blind_pair": 1}
    assert manifest["source"]["clip_model"] == BLIND_SPEC
    assert all(p["image_a"] < p["image_b"] and "twin" not in (p["image_a"], p["image_b"]) for p in pairs)
    assert all(caption_signature(p["caption_a"]) != caption_signature(p["caption_b"]) for p in pairs)
    assert all(os.path.isfile(os.path.join(bench, p["file_a"])) for p in pairs)
    colour_only = _colour_only(pairs, layout)
    assert colour_only.mean() >= 0.9
    probes = pq.read_table(os.path.join(bench, "invariance.parquet")).to_pylist()
    assert {p["transform"] for p in probes} == {"grayscale", "hflip"}
    assert all(p["caption"] in p["pool"] and json.loads(p["params"]) is not None for p in probes)
    text_pairs = pq.read_table(os.path.join(bench, "text_pairs.parquet")).to_pylist()
    assert [[t["caption_a"], t["caption_b"]] for t in text_pairs] == TEXT_PAIRS
    card = open(os.path.join(bench, "README.md")).read()
    assert BLIND_SPEC in card and 'load_dataset("parquet"' in card and "pq.read_table" in card

    out = tmp_path / "scores.json"
    results = tmp_path / "clip-benchmark"
    assert main(["score", bench, "--model", BLIND_SPEC, "--model", ALIGNED_SPEC, "--runner", "local",
                 "--json", str(out), "--clip-benchmark-dir", str(results), "--severities", "1,5"]) == 0
    printed = capsys.readouterr().out
    assert BLIND_SPEC in printed and "pair accuracy" in printed and "pairs under gaussian_blur" in printed
    scores = json.loads(out.read_text())["models"]
    for spec in (BLIND_SPEC, ALIGNED_SPEC):
        figure = scores[spec]["pair_accuracy"]
        assert figure["n"] == scores[spec]["n_pairs"] == len(pairs)
        assert figure["ci95"][0] <= figure["value"] <= figure["ci95"][1]
        assert set(scores[spec]["invariance"]) == {"grayscale", "hflip"}
        assert scores[spec]["text_separation"]["ci95"] is not None
    assert scores[ALIGNED_SPEC]["pair_accuracy"]["value"] >= 0.9
    for spec in (BLIND_SPEC, ALIGNED_SPEC):
        graded = scores[spec]["pair_accuracy_by_severity"]
        assert set(graded) == {"jpeg", "downscale", "gaussian_blur", "gaussian_noise", "brightness"}
        assert all(set(levels) == {"1", "5"} and all(f["n"] == len(pairs) for f in levels.values())
                   for levels in graded.values())
    assert scores[ALIGNED_SPEC]["pair_accuracy_by_severity"]["downscale"]["1"]["value"] >= 0.8
    assert scores[BLIND_SPEC]["pair_accuracy"]["value"] <= 0.1
    assert scores[ALIGNED_SPEC]["invariance"]["hflip"]["value"] == 1.0
    assert scores[ALIGNED_SPEC]["text_separation"]["value"] == 1.0
    assert scores[BLIND_SPEC]["text_separation"]["value"] == 0.0
    assert_clip_benchmark_builds(results, scores)

    details = score_benchmark(bench, [BLIND_SPEC, ALIGNED_SPEC], runner="local")
    assert details[BLIND_SPEC].pair_correct[colour_only].mean() <= 0.05
    assert details[ALIGNED_SPEC].pair_correct[colour_only].mean() >= 0.9


def test_the_same_run_exports_the_same_bytes(audited, tmp_path):
    run_dir, _ = audited
    first, second = tmp_path / "a", tmp_path / "b"
    export_benchmark(run_dir, str(first))
    export_benchmark(run_dir, str(second))
    export_benchmark(run_dir, str(second))
    files = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert "pairs.parquet" in files and any(f.startswith("images/") for f in files)
    assert files == sorted(str(p.relative_to(second)) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_reference_mode_writes_uris_instead_of_copies(audited, tmp_path):
    run_dir, _ = audited
    bench = tmp_path / "ref"
    export_benchmark(run_dir, str(bench), images="reference")
    pairs = pq.read_table(bench / "pairs.parquet").to_pylist()
    assert not (bench / "images").exists()
    assert all(os.path.isabs(p["file_a"]) and p["file_a"].endswith(".png") for p in pairs)


def test_bad_input_gets_a_clear_error(audited, tmp_path, capsys):
    run_dir, _ = audited
    empty = RunTables(str(tmp_path / "empty"))
    empty.insert_new(SAMPLES, samples_to_table([]), "image_id", SAMPLES_SCHEMA)
    with pytest.raises(BenchmarkError, match="nothing to export.*run the daf, tcac or validate stage"):
        export_benchmark(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "not a clipaudit run directory" in capsys.readouterr().err
    assert main(["export", run_dir, str(tmp_path / "out"), "--clip-model", "tiny-clip"]) == 2
    err = capsys.readouterr().err
    assert "no CLIP-role model 'tiny-clip'" in err and BLIND_SPEC in err

    bench = tmp_path / "bench"
    export_benchmark(run_dir, str(bench), llm="off")
    manifest = json.loads((bench / "benchmark.json").read_text())
    (bench / "benchmark.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    assert main(["score", str(bench), "--model", ALIGNED_SPEC, "--runner", "local"]) == 2
    assert f"format version {FORMAT_VERSION + 1} is newer" in capsys.readouterr().err
    (bench / "benchmark.json").write_text(json.dumps(manifest))

    assert main(["score", str(bench), "--model", "python:no_such_module:factory", "--runner", "local"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err
    with pytest.raises(BenchmarkError, match="lacks encode_texts"):
        score_benchmark(str(bench), ["python:planted_models:colour_aware"], runner="local")
    with pytest.raises(BenchmarkError, match="no text tower"):
        score_benchmark(str(bench), ["tiny-dino"], runner="local")


def test_captions_that_differ_only_in_case_punctuation_or_articles_are_near_identical():
    assert caption_signature("A red circle, on the left.") == caption_signature("red  circle on THE left")
    assert caption_signature("a red circle on the left") != caption_signature("a green circle on the left")
    assert caption_signature("a red square left of a blue circle") != caption_signature(
        "a blue square left of a red circle")


@pytest.mark.ray
def test_scoring_on_ray_gives_the_in_process_figures(audited, tmp_path, ray_local):
    """tiny-clip: Ray's actors import clipaudit, not the tests' plug-in modules."""
    run_dir, _ = audited
    bench = str(tmp_path / "bench")
    export_benchmark(run_dir, bench, llm="off")
    embed = EmbedConfig(batch_size=64, actors_per_model=1, cpus_per_actor=0.5)
    on_ray = score_benchmark(bench, ["tiny-clip"], runner="ray", embed=embed)["tiny-clip"]
    local = score_benchmark(bench, ["tiny-clip"], runner="local", embed=embed)["tiny-clip"]
    assert on_ray.figures["n_pairs"] > 0
    assert np.array_equal(on_ray.pair_correct, local.pair_correct)
    assert np.array_equal(on_ray.invariant, local.invariant)
    assert on_ray.figures == local.figures


def test_specs_become_clip_benchmark_model_and_pretrained_names():
    from clipaudit.benchmark.clip_benchmark import model_and_pretrained, result_records

    assert model_and_pretrained("open_clip:ViT-B-32/openai") == ("ViT-B-32", "openai")
    assert model_and_pretrained("hf:google/siglip-base-patch16-224") == ("google/siglip-base-patch16-224", "hf")
    assert model_and_pretrained("tiny-clip") == ("tiny-clip", "clipaudit")
    figure = {"value": 0.5, "ci95": [0.4, 0.6], "n": 10}
    records = result_records("bench", {"open_clip:ViT-B-32/openai": {
        "pair_accuracy": figure, "invariance": {"hflip": figure}, "text_separation": figure, "n_pairs": 10}})
    names = [name for name, _ in records]
    assert names[0] == "clipaudit-bench_openai_ViT-B-32_en_clipaudit_pairs.json" and len(set(names)) == 3
    assert all(set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
               for _, record in records)
