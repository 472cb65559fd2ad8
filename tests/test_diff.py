"""``clipaudit diff``: two runs of the small audit with different seeds (corpus, TCAC and the failure types the
fake LLM names all differ), an earlier run of one directory read back through its table tags, and a run against
itself.

The models comparison works on copies of the small run whose ``models.json`` the pipeline's own functions record
again (``resolve_models`` then ``record_models``) for other model lists: the packaged probe models (hashed weights),
``open_clip:ViT-B-32/openai`` found in a fake hub cache (a revision and a placeholder weights file, so two caches give
two hashes and revisions) or not found at all (``models.fallback: tiny`` runs tiny-clip instead), tiny models; and a
copy with no ``models.json`` (a run from before it was recorded)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hub_cache import add_repo
from report_fixtures import N_IMAGES, TRANSFORMS, build_run

from clipaudit.cli import main
from clipaudit.config import load_config
from clipaudit.pipeline import record_models, resolve_models
from clipaudit.run_models import MODELS_FILE, run_provenance
from clipaudit.runs import finished_runs

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "clipaudit" / "models" / "weights"
OPENAI = "open_clip:ViT-B-32/openai"
OPENAI_REPO = "timm/vit_base_patch32_clip_224.openai"
"""The hub repo open_clip reads ``ViT-B-32/openai`` from (a fake one in a test cache)."""
REV_1, REV_2, REV_3 = "1a" * 20, "2b" * 20, "3c" * 20


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
    assert text.splitlines()[2:5] == [
        "models (weights): 2 same", "  = clip tiny-clip: same weights (RANDOM weights, no weight files (random "
        "(seeded)))", "  = reference tiny-dino: same weights (RANDOM weights, no weight files (random (seeded, from "
        "the architecture's config)))"]
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
    assert d["provenance"]["counts"]["same"] == 2 and d["provenance"]["warnings"] == []
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_cache(root: Path, revision: str, content: bytes) -> Path:
    """A hub cache holding ``OPENAI_REPO`` at ``revision``, its weights file ``content`` (a placeholder: resolving
    the spec finds it, nothing loads it)."""
    files = root / f"files-{revision}"
    files.mkdir(parents=True)
    (files / "open_clip_model.safetensors").write_bytes(content)
    add_repo(root / f"cache-{revision}", OPENAI_REPO, files, revision)
    return root / f"cache-{revision}"


def run_with_models(source: Path, run_dir: Path, clip: list[str], reference: list[str],
                    cache: Path | None = None) -> Path:
    """A copy of the run ``source`` whose models.json records what ``clip`` and ``reference`` resolve to (as a run
    records them: ``resolve_models`` then ``record_models``, with ``models.fallback: tiny`` and ``cache`` as the
    models' cache), and whose summary carries that provenance as the report stage writes it."""
    shutil.copytree(source, run_dir)
    (run_dir / MODELS_FILE).unlink()
    overrides = [f"run_dir={run_dir}", f"models.clip={json.dumps(clip)}", f"models.reference={json.dumps(reference)}",
                 "models.fallback=tiny", f"models.cache_dir={cache or run_dir.parent / 'empty-cache'}"]
    config = load_config(None, overrides)
    record_models(config, resolve_models(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["provenance"] = run_provenance(str(run_dir), {"models": {"clip": clip, "reference": reference}})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def diff(a: Path, b: Path, out: Path, capsys) -> tuple[list[str], dict]:
    """``clipaudit diff A B --json OUT``: the printed lines and the JSON."""
    assert main(["diff", str(a), str(b), "--json", str(out)]) == 0
    return capsys.readouterr().out.splitlines(), json.loads(out.read_text())


def rows(d: dict) -> dict[tuple[str, str], dict]:
    return {(row["role"], row["spec"]): row for row in d["provenance"]["models"]}


def test_the_diff_opens_with_the_weights_of_each_model(report_run: Path, tmp_path: Path, capsys) -> None:
    probe_clip, probe_dino = ((WEIGHTS / f"{name}.safetensors").read_bytes() for name in ("probe-clip", "probe-dino"))
    one, two = b"checkpoint of Monday", b"checkpoint of Tuesday, retrained"
    run_a = run_with_models(report_run, tmp_path / "a", ["probe-clip", OPENAI, "tiny-clip"], ["probe-dino"],
                            hub_cache(tmp_path, REV_1, one))
    run_b = run_with_models(report_run, tmp_path / "b", ["probe-clip", OPENAI], ["probe-dino", "tiny-dino"],
                            hub_cache(tmp_path, REV_2, two))
    lines, d = diff(run_a, run_b, tmp_path / "d.json", capsys)

    assert lines[2] == "models (weights): 2 same; 1 changed; 1 only in A; 1 only in B", "first, after A and B"
    assert lines[3:8] == [
        f"  = clip probe-clip: same weights (sha256 {sha256(probe_clip)[:12]})",
        f"  ~ clip {OPENAI}: CHANGED (weights, revision): A sha256 {sha256(one)[:12]}, revision {REV_1[:12]}; "
        f"B sha256 {sha256(two)[:12]}, revision {REV_2[:12]}",
        "  - clip tiny-clip: only in A (RANDOM weights, no weight files (random (seeded)))",
        f"  = reference probe-dino: same weights (sha256 {sha256(probe_dino)[:12]})",
        "  + reference tiny-dino: only in B (RANDOM weights, no weight files (random (seeded, from the "
        "architecture's config)))"]
    assert not any(line.startswith("WARNING: clip") for line in lines), "no model is random in one run only"

    p = d["provenance"]
    assert p["known_a"] and p["known_b"] and p["warnings"] == []
    assert p["counts"] == {"same": 2, "changed": 1, "fallback": 0, "only_a": 1, "only_b": 1, "unknown": 0}
    changed = rows(d)[("clip", OPENAI)]
    assert changed["status"] == "changed" and changed["differs"] == ["weights_sha256", "revision"]
    assert (changed["a"]["weights_sha256"], changed["a"]["revision"]) == (sha256(one), REV_1)
    assert (changed["b"]["weights_sha256"], changed["b"]["revision"]) == (sha256(two), REV_2)
    assert changed["a"]["fallback"] is False and changed["b"]["ran"] == OPENAI
    assert rows(d)[("clip", "tiny-clip")]["b"] is None and rows(d)[("reference", "tiny-dino")]["a"] is None


def test_a_fallback_in_one_run_is_said_loudly(report_run: Path, tmp_path: Path, capsys) -> None:
    weights = b"the real checkpoint"
    fell_back = run_with_models(report_run, tmp_path / "fell-back", [OPENAI], ["probe-dino"])
    real = run_with_models(report_run, tmp_path / "real", [OPENAI], ["probe-dino"], hub_cache(tmp_path, REV_1, weights))
    lines, d = diff(fell_back, real, tmp_path / "d.json", capsys)
    real_text = f"sha256 {sha256(weights)[:12]}, revision {REV_1[:12]}"
    fallback_text = "ran tiny-clip (fallback, RANDOM), no weight files (random (seeded))"
    assert lines[2] == "models (weights): 1 same; 1 random in one run, real in the other"
    assert f"  ! clip {OPENAI}: RANDOM in A, real weights in the other: A {fallback_text}; B {real_text}" in lines
    assert (f"WARNING: clip {OPENAI}: random weights in A ({fallback_text}) but real weights in B: this diff "
            "compares a random model with a real one") in lines
    row = rows(d)[("clip", OPENAI)]
    assert row["status"] == "fallback" and row["random_in"] == "A"
    assert row["a"]["ran"] == "tiny-clip" and row["a"]["fallback"] is True and row["a"]["weights_sha256"] is None
    assert row["b"]["ran"] == OPENAI and row["b"]["weights_sha256"] == sha256(weights)
    assert d["provenance"]["warnings"] and OPENAI in d["provenance"]["warnings"][0]

    lines, d = diff(real, fell_back, tmp_path / "reverse.json", capsys)
    assert f"  ! clip {OPENAI}: RANDOM in B, real weights in the other: A {real_text}; B {fallback_text}" in lines
    assert rows(d)[("clip", OPENAI)]["random_in"] == "B"

    moved = run_with_models(report_run, tmp_path / "moved", [OPENAI], ["probe-dino"], hub_cache(tmp_path, REV_3,
                                                                                              weights))
    lines, d = diff(real, moved, tmp_path / "moved.json", capsys)
    assert (f"  ~ clip {OPENAI}: CHANGED (revision): A {real_text}; B sha256 {sha256(weights)[:12]}, revision "
            f"{REV_3[:12]}") in lines, "the same file under another revision: the hashes show it is the same"
    assert rows(d)[("clip", OPENAI)]["differs"] == ["revision"]
    assert not any(line.startswith("WARNING: clip") for line in lines)


def test_a_run_from_before_models_json_has_unknown_provenance(report_run: Path, tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    shutil.copytree(report_run, old)
    (old / MODELS_FILE).unlink()
    summary = json.loads((old / "summary.json").read_text())
    del summary["provenance"]
    (old / "summary.json").write_text(json.dumps(summary))

    lines, d = diff(old, report_run, tmp_path / "d.json", capsys)
    assert lines[2] == ("models (weights): provenance unknown in A (no models.json: written before provenance was "
                        "recorded)")
    assert lines[3:5] == ["  ? clip tiny-clip: provenance unknown in A; B RANDOM weights, no weight files (random "
                          "(seeded))",
                          "  ? reference tiny-dino: provenance unknown in A; B RANDOM weights, no weight files "
                          "(random (seeded, from the architecture's config))"]
    assert "failure types: A 4, B 4: 0 new, 0 gone, 0 changed, 4 unchanged" in lines, "the rest is compared as before"
    p = d["provenance"]
    assert (p["known_a"], p["known_b"]) == (False, True) and p["counts"]["unknown"] == 2
    assert {row["status"] for row in p["models"]} == {"unknown"} and all(row["a"] is None for row in p["models"])

    lines, d = diff(old, old, tmp_path / "both.json", capsys)
    assert lines[2] == ("models (weights): provenance unknown in A and B (no models.json: written before "
                        "provenance was recorded)")
    assert d["provenance"]["models"] == [] and not d["provenance"]["known_b"]

    shutil.copyfile(report_run / MODELS_FILE, old / MODELS_FILE)
    lines, d = diff(old, report_run, tmp_path / "later.json", capsys)
    assert lines[2] == "models (weights): 2 same", "a summary from before models.json: the file is read instead"
