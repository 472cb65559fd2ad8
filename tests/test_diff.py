"""``clipaudit diff``: two runs of the small audit with different seeds (corpus, TCAC and the failure types the
fake LLM names all differ), an earlier run of one directory read back through its table tags, and a run against
itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from report_fixtures import N_IMAGES, TRANSFORMS, build_run

from clipaudit.cli import main
from clipaudit.runs import finished_runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("diff") / "seed1"
    build_run(run_dir, variant=1)
    return run_dir


def test_diff_of_two_seeds(report_run: Path, other_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "diff.json"
    assert main(["diff", str(report_run), str(other_run), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "+ new   DAF: Colour binding" in text and "+ new   TCAC: Colour binding" in text
    assert "- gone  DAF: Spatial relations" in text and "- gone  TCAC: Spatial relations" in text
    assert f"corpus: A {N_IMAGES} images, B {N_IMAGES}; 0 in both (Jaccard 0.000)" in text
    assert "models: same (clip tiny-clip, reference tiny-dino)" in text
    assert "WARNING: random models in A and B" in text
    for transform in TRANSFORMS:
        assert f"  {transform}: " in text
    d = json.loads(out.read_text())
    assert {(t["method"], t["name"]) for t in d["failure_types"]["new"]} == {("DAF", "Colour binding"),
                                                                             ("TCAC", "Colour binding")}
    assert {(t["method"], t["name"]) for t in d["failure_types"]["gone"]} == {("DAF", "Spatial relations"),
                                                                              ("TCAC", "Spatial relations")}
    assert d["failure_types"]["unchanged"] + len(d["failure_types"]["changed"]) == 2, "Counting is in both"
    assert d["corpus"]["both"] == 0 and d["corpus"]["only_a"] == d["corpus"]["only_b"] == N_IMAGES
    assert d["corpus"]["examples_only_a"][0].startswith("scene_0_")
    assert d["corpus"]["examples_only_b"][0].startswith("scene_1_")
    assert set(d["tcac"]["transforms"]) == set(TRANSFORMS) and d["tcac"]["only_a"] == d["tcac"]["only_b"] == []
    grayscale = d["tcac"]["transforms"]["grayscale"]["mean_changed"]
    assert grayscale["delta"] == pytest.approx(grayscale["b"] - grayscale["a"])
    assert d["daf"]["in_a"] and d["daf"]["in_b"] and d["daf"]["mean_overlap"]["a"] is not None
    assert d["models_changed"] == {}
    assert d["a"]["run_id"] == finished_runs(str(report_run))[-1]
    assert main(["diff", str(report_run), str(other_run), "--fail-on-new"]) == 3


def test_diff_against_an_earlier_run_of_the_same_directory(report_run: Path, tmp_path: Path, capsys) -> None:
    ingest_run, full_run = finished_runs(str(report_run))
    out = tmp_path / "d.json"
    assert main(["diff", f"{report_run}@previous", str(report_run), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"A: {report_run}@{ingest_run} (run {ingest_run})" in text
    assert f"corpus: A {N_IMAGES} images, B {N_IMAGES}; {N_IMAGES} in both (Jaccard 1.000)" in text
    assert "failure types: A missing, B 4: 4 new, 0 gone" in text
    d = json.loads(out.read_text())
    assert d["daf"]["in_a"] is False and d["daf"]["in_b"] is True
    assert d["counts"]["embedded"] == {"a": 0, "b": N_IMAGES, "delta": N_IMAGES}
    assert "tcac" in d["stages"]["ran_in_b_only"]
    assert main(["diff", f"{report_run}@{full_run}", str(report_run)]) == 0
    same = capsys.readouterr().out
    assert "0 new, 0 gone, 0 changed, 4 unchanged" in same
    assert f"{N_IMAGES} in both (Jaccard 1.000)" in same


def test_diff_names_what_it_cannot_read(report_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["diff", f"{report_run}@20000101T000000Z-000000", str(report_run)]) == 2
    assert "no finished run '20000101T000000Z-000000'" in capsys.readouterr().err
    assert main(["diff", str(tmp_path), str(report_run)]) == 2
    assert "not a clipaudit run directory" in capsys.readouterr().err


def test_nightly_job_audits_then_diffs_against_the_previous_night(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("nightly_job", REPO / "jobs" / "nightly.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run_dir = tmp_path / "nightly"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "dataset": {"format": "synthetic", "num_images": 10, "seed": 2},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"}, "ray": {"runner": "local"},
        "neighbours": {"k": 3}, "daf": {"max_overlap": None, "top_n": 2, "permutations": 5},
        "tcac": {"transforms": ["hflip"], "cases_per_transform": 1}, "llm": {"dry_run": True}}))
    assert job.nightly(["--config", str(config)]) == 0
    assert not (run_dir / "diffs").exists(), "the first night has nothing to compare with"
    assert job.nightly(["--config", str(config), "--set", "dataset.num_images=11", "--fail-on-new"]) == 0
    first, second = finished_runs(str(run_dir))
    d = json.loads((run_dir / "diffs" / f"{second}.json").read_text())
    assert (d["a"]["run_id"], d["b"]["run_id"]) == (first, second)
    assert d["corpus"]["both"] == 10 and d["corpus"]["only_b"] == 1
    assert d["counts"]["embedded"] == {"a": 10, "b": 11, "delta": 1}
    assert d["failure_types"]["new"] == [] and d["stages"] == {"ran_in_a_only": [], "ran_in_b_only": []}


def test_a_new_failure_type_of_any_model_counts_as_new():
    from clipaudit.report.diff import new_failure_types

    one = {"failure_types": {"new": [{"method": "DAF", "name": "colour"}]}}
    assert new_failure_types(one) == ["colour"]
    several = {"failure_types": {"new": []}, "per_model": {
        "a": {"failure_types": {"new": []}},
        "b": {"failure_types": {"new": [{"method": "TCAC", "name": "rotation"}]}}}}
    assert new_failure_types(several) == ["b: rotation"]
    assert new_failure_types({"per_model": {"a": {"failure_types": None}}}) == []
