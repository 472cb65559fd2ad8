"""The name stage on a hand-built run: its rows beside the LLM's (summarize through the fake endpoint), re-runs
that replace instead of duplicating, an old table without a namer, and the report's agreement table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest
from fake_openai import FakeOpenAI

from clipaudit.config import load_config
from clipaudit.io import failure_types
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline
from clipaudit.probe.scenes import corpus_spec, render_scene, variant
from clipaudit.records import FAILURE_TYPES, FAILURE_TYPES_SCHEMA, with_clip_model

KEY = "sk-test-name-stage-0123456789"
ENV = "CLIPAUDIT_TEST_NAME_KEY"
ANSWER = json.dumps({"failure_types": [
    {"name": "Spatial relations", "description": "Ignores whether objects are on the left or the right."},
    {"name": "Texture", "description": "Ignores the texture of surfaces."}]})


def build_run(run_dir: Path, n: int = 60) -> RunTables:
    """Probe scenes as samples, the first 40 with a position variant each: scenes 20-39 as DAF cases whose CLIP-only
    neighbour is their variant, scenes 0-19 and their variants as blind pairs (the pair of case 20 and its variant
    listed again, which counts once)."""
    tables = RunTables(str(run_dir))
    images = run_dir / "images"
    images.mkdir(parents=True)
    rng = random.Random(0)
    specs = {f"s{i:03d}": corpus_spec(11, i) for i in range(n)}
    moved = {f"m{i:03d}": variant(specs[f"s{i:03d}"], "position", rng) for i in range(40)}
    ids, captions, uris, labels = [], [], [], []
    for image_id, spec in {**specs, **moved}.items():
        path = images / f"{image_id}.png"
        render_scene(spec).resize((64, 64)).save(path)
        ids.append(image_id)
        captions.append(spec.captions()[0])
        uris.append(str(path))
        labels.append(spec.to_json())
    samples = pa.table({"image_id": ids, "uri": uris, "caption": captions, "captions": [[c] for c in captions],
                        "label": labels})
    tables.insert_new("samples", samples, "image_id", samples.schema)
    case_range = range(20, 40)
    cases = pa.table({
        "image_id": [f"s{i:03d}" for i in case_range],
        "rank": pa.array(range(1, 21), pa.int32()),
        "score": pa.array([0.9] * 20, pa.float32()),
        "caption": [specs[f"s{i:03d}"].captions()[0] for i in case_range],
        "captions": [[specs[f"s{i:03d}"].captions()[0], moved[f"m{i:03d}"].captions()[0]] for i in case_range],
        "clip_only": [[f"m{i:03d}"] for i in case_range],
        "reference_only": [[f"s{20 + (i + 1) % 20:03d}"] for i in case_range],
    })
    tables.insert_new("daf_cases", cases, "image_id", cases.schema)
    blind_ids = [*range(20), 20]
    blind = pa.table({"image_a": [f"m{i:03d}" for i in blind_ids], "image_b": [f"s{i:03d}" for i in blind_ids],
                      "gap": pa.array([0.5] * len(blind_ids), pa.float32())})
    tables.insert_new("blind_pairs", blind, ["image_a", "image_b"], blind.schema)
    return tables


def config_for(run_dir: Path, base_url: str = "http://127.0.0.1:9/v1", *extra: str):
    return load_config(None, [f"run_dir={run_dir}", f"llm.base_url={base_url}", f"llm.api_key_env={ENV}",
                              "llm.model=gpt-4o-mini", "llm.timeout_s=2.0", "ray.runner=local",
                              "report.workers=1", *extra])


def by_namer(tables: RunTables) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in tables.read(FAILURE_TYPES).to_pylist():
        out.setdefault(row["namer"], []).append(row)
    return out


def test_name_writes_its_types_beside_the_llms_and_reruns_replace(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    run_dir = tmp_path / "run"
    tables = build_run(run_dir)
    with FakeOpenAI(answer=lambda body: ANSWER, api_key=KEY) as server:
        config = config_for(run_dir, server.base_url)
        run_pipeline(config, ["name"])
        first = by_namer(tables)
        assert list(first) == ["caption_contrast"]
        top = min(first["caption_contrast"], key=lambda r: r["rank"])
        assert top["name"].startswith("spatial position") and top["method"] == "DAF"
        assert top["support"] == 40 and len(top["evidence_pairs"]) == 10
        assert top["evidence_pairs"][0].count("|") == 1 and {"left", "right"} & set(top["terms"])

        run_pipeline(config, ["summarize"])
        both = by_namer(tables)
        assert sorted(both) == ["caption_contrast", "llm"]
        assert {r["name"] for r in both["llm"]} == {"Spatial relations", "Texture"}
        run_pipeline(config, ["name"])
        again = by_namer(tables)
        assert len(again["caption_contrast"]) == len(first["caption_contrast"]) and len(again["llm"]) == 2

        run_pipeline(config, ["report"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {t["namer"] for t in summary["failure_types"]} == {"caption_contrast", "llm"}
    assert summary["probe"]["scenes"] == 100
    assert summary["probe"]["blind_pairs"]["position"]["only"] == pytest.approx(1.0)
    html = (run_dir / "report" / "index.html").read_text()
    assert "where the two namers agree" in html and "LLM only" in html and "Texture" in html
    assert "truth: only position" in html


def test_a_failure_types_table_from_before_the_namers_is_read_as_the_llms(tmp_path):
    run_dir = tmp_path / "run"
    tables = build_run(run_dir)
    config = config_for(run_dir)
    spec = config.models.clip_models[0]
    old_schema = with_clip_model(pa.schema([f for f in FAILURE_TYPES_SCHEMA
                                            if f.name not in ("namer", "terms", "evidence_pairs")]))
    old = pa.Table.from_pylist([{"name": "Colour confusion", "method": "DAF", "support": 3, "rank": 1,
                                 "clip_model": spec}], schema=old_schema)
    tables.replace(FAILURE_TYPES, old, old_schema)
    assert failure_types.read_rows(tables, "llm")[0]["name"] == "Colour confusion"
    run_pipeline(config, ["name"])
    rows = by_namer(tables)
    assert [r["name"] for r in rows["llm"]] == ["Colour confusion"]
    assert rows["caption_contrast"]


def test_no_flagged_pair_writes_no_type_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tables = build_run(run_dir)
    tables.delete("blind_pairs", "true")
    tables.replace("daf_cases", tables.read("daf_cases").slice(0, 0), tables.read("daf_cases").schema)
    run_pipeline(config_for(run_dir), ["name"])
    assert failure_types.read_rows(tables, "caption_contrast") == []
    stats = json.loads((run_dir / "stats" / "name.json").read_text())
    assert "no flagged pairs" in stats["notes"]["summary"]


def write_reference_neighbours(tables: RunTables, spec: str, clip_model: str) -> None:
    """``neighbours`` rows of the reference role: each image's neighbours are the next two images by id, then its
    position variant (a flagged pair, which the background leaves out) or the third next; plus one row of the
    CLIP role, which the name stage must not read."""
    from clipaudit.records import NEIGHBOURS, NEIGHBOURS_STORED_SCHEMA

    ids = sorted(tables.read("samples", ["image_id"]).column("image_id").to_pylist())
    rows = [{"image_id": image_id, "model": "reference",
             "ids": [ids[(i + 1) % len(ids)], ids[(i + 2) % len(ids)],
                     "s" + image_id[1:] if image_id.startswith("m") else ids[(i + 3) % len(ids)]],
             "sims": [0.9, 0.8, 0.7], "k": 3, "method": "exact", "spec": spec, "clip_model": "",
             "reference_model": spec} for i, image_id in enumerate(ids)]
    rows.append({"image_id": ids[0], "model": "clip", "ids": ids[1:4], "sims": [0.9, 0.8, 0.7], "k": 3,
                 "method": "exact", "spec": clip_model, "clip_model": clip_model, "reference_model": ""})
    tables.insert_new(NEIGHBOURS, pa.Table.from_pylist(rows, schema=NEIGHBOURS_STORED_SCHEMA),
                      ["image_id", "model", "clip_model", "reference_model"], NEIGHBOURS_STORED_SCHEMA)


def test_the_background_takes_reference_neighbours_and_a_rerun_writes_the_same_rows(tmp_path):
    run_dir = tmp_path / "run"
    tables = build_run(run_dir)
    config = config_for(run_dir)
    write_reference_neighbours(tables, config.models.reference, config.models.clip_models[0])
    run_pipeline(config, ["name"])
    stats = json.loads((run_dir / "stats" / "name.json").read_text())
    assert stats["counts"]["flagged_pairs"] == 40, "the blind pair listed again as a case pair counts once"
    assert stats["counts"]["background_reference_pairs"] == 2 * 100 + 60, "every unflagged pair, once"
    assert "260 reference neighbours" in stats["notes"]["summary"]
    first = failure_types.read_rows(tables, "caption_contrast")
    assert first[0]["name"].startswith("spatial position") and first[0]["support"] == 40
    run_pipeline(config, ["name"])
    again = failure_types.read_rows(tables, "caption_contrast")
    assert sorted(first, key=lambda r: r["rank"]) == sorted(again, key=lambda r: r["rank"])


def test_the_reference_lists_are_sampled_not_expanded_whole(tmp_path):
    from clipaudit.stages.name import reference_pairs
    from clipaudit.stages.upstream import model_view

    run_dir = tmp_path / "run"
    tables = build_run(run_dir)
    config = config_for(run_dir)
    write_reference_neighbours(tables, config.models.reference, config.models.clip_models[0])
    view = model_view(tables, config)
    ids = sorted(tables.read("samples", ["image_id"]).column("image_id").to_pylist())
    index = {image_id: i for i, image_id in enumerate(ids)}
    every = reference_pairs(view, index, rows=10_000, seed=0)
    assert len(every) == 3 * len(ids)
    some = reference_pairs(view, index, rows=10, seed=0)
    assert len({a for a, _ in some}) == 10 and len(some) == 30 and set(some) <= set(every)
    assert some == reference_pairs(view, index, rows=10, seed=0) != reference_pairs(view, index, rows=10, seed=1)
