"""Several reference models: ``daf.consensus`` decides whether every reference, or any, must disagree with CLIP.

The CLIP-role model is colour-blind (``python:planted_models:colour_blind``); of the two references, one sees
layout and colour (``colour_aware``) and one is itself colour-blind (``layout_only``): a reference that is wrong in
the same way as the model under audit. With ``consensus: all`` the wrong reference vetoes every finding (no
CLIP-blind pair, no case at zero overlap); with ``any`` the colour variants are CLIP-blind pairs again, each naming
the reference that told them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from planted_scenes import write_corpus

from clipaudit.config import load_config
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline

CLIP = "python:planted_models:colour_blind"
AWARE = "python:planted_models:colour_aware"
WRONG = "python:planted_models:layout_only"


def _run(root: Path, consensus: str) -> RunTables:
    config = load_config(None, [
        f"run_dir={root / consensus}", "dataset.format=manifest", f"dataset.captions={root / 'manifest.csv'}",
        f"models.clip={CLIP}", f"models.reference={json.dumps([AWARE, WRONG])}", f"daf.consensus={consensus}",
        "ray.runner=local", "neighbours.k=4", "neighbours.device=cpu", "daf.max_overlap=0.25",
        "daf.permutations=20"])
    run_pipeline(config, ["ingest", "embed", "neighbours", "daf", "leaderboard"])
    return RunTables(config.run_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    return root, write_corpus(root)


def _attributes(tables: RunTables, truth: dict) -> dict[str, tuple[str, str]]:
    return {row["image_id"]: truth[Path(row["uri"]).stem]
            for row in tables.read("samples", ["image_id", "uri"]).to_pylist()}


def test_each_reference_is_embedded_and_searched_once(corpus):
    root, _ = corpus
    tables = _run(root, "all")
    specs = set(tables.read("image_embeddings_reference", ["reference_model"]).column("reference_model").to_pylist())
    assert specs == {AWARE, WRONG}
    rows = tables.read("neighbours", ["model", "clip_model", "reference_model"]).to_pylist()
    assert {(r["model"], r["clip_model"], r["reference_model"]) for r in rows} == {
        ("clip", CLIP, ""), ("reference", "", AWARE), ("reference", "", WRONG)}
    stats = json.loads((Path(tables.run_dir) / "stats" / "daf.json").read_text())
    assert set(stats["notes"]["per_reference"]) == {AWARE, WRONG}
    assert stats["notes"]["per_reference"][WRONG]["mean_overlap"] == pytest.approx(1.0)


def test_with_consensus_all_a_wrong_reference_vetoes_the_findings(corpus):
    root, _ = corpus
    tables = _run(root, "all")
    assert tables.read("blind_pairs").num_rows == 0
    assert tables.read("daf_cases").num_rows == 0


def test_with_consensus_any_one_reference_that_sees_colour_is_enough(corpus):
    root, truth = corpus
    tables = _run(root, "any")
    attributes = _attributes(tables, truth)
    pairs = tables.read("blind_pairs", ["image_a", "image_b", "references"]).to_pylist()
    assert pairs
    colour_only = [attributes[p["image_a"]][0] == attributes[p["image_b"]][0]
                   and attributes[p["image_a"]][1] != attributes[p["image_b"]][1] for p in pairs]
    assert sum(colour_only) / len(pairs) >= 0.9
    assert all(p["references"] == [AWARE] for p in pairs)
    cases = tables.read("daf_cases", ["image_id", "references", "reference_overlaps"]).to_pylist()
    assert len(cases) == 25
    for case in cases:
        assert case["references"] == [AWARE]
        assert case["reference_overlaps"][1] == pytest.approx(1.0) and case["reference_overlaps"][0] <= 0.25


def test_the_report_and_the_export_work_with_several_references(corpus, tmp_path):
    root, _ = corpus
    tables = _run(root, "any")
    config = load_config(str(Path(tables.run_dir) / "config.resolved.yaml"))
    run_pipeline(config, ["report"])
    summary = json.loads((Path(tables.run_dir) / "summary.json").read_text())
    assert summary["daf"]["cases"] == 25
    assert (Path(tables.run_dir) / "report" / "index.html").stat().st_size > 0
    from clipaudit.benchmark.export import export_benchmark

    manifest = export_benchmark(tables.run_dir, str(tmp_path / "bench"), llm="off")
    assert manifest["counts"]["pairs"]["blind_pair"] > 0
