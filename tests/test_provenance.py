"""Provenance of a run's models (issue 19.4): ``models.json`` records per model the spec asked for, what ran (a
fallback included) and the weights' SHA-256; ``summary.json``, the leaderboard, the report, the export and
``score`` carry it; a resumed run whose weights changed is refused unless it is a new run (``--new-run``); the
leaderboard lists the run's models only.

One small audit on the local runner: ``probe-clip`` (packaged weights, hashed) and ``open_clip:ViT-B-32/openai``
(no weights in an empty cache, so ``models.fallback: tiny`` runs ``tiny-clip`` instead), against ``probe-dino``.
The tests that change a run work on copies of it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipaudit.cli import main
from clipaudit.io.tables import RunTables
from clipaudit.run_models import ModelsChangedError, read_models, run_provenance
from clipaudit.run_view import RunView

PROBE = "probe-clip"
FALLS_BACK = "open_clip:ViT-B-32/openai"
REFERENCE = "probe-dino"
WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "clipaudit" / "models" / "weights"
STAGES = "ingest,embed,neighbours,daf,tcac,leaderboard,report"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(root: Path, run_dir: Path, clip: list[str]) -> Path:
    """A small audit's config (12 synthetic images, k=3, one transform, no LLM) for ``clip`` against probe-dino."""
    (root / "empty-cache").mkdir(exist_ok=True)
    config = {
        "run_dir": str(run_dir),
        "dataset": {"format": "synthetic", "num_images": 12, "seed": 0},
        "models": {"clip": clip, "reference": REFERENCE, "fallback": "tiny", "cache_dir": str(root / "empty-cache")},
        "ray": {"runner": "local"},
        "embed": {"batch_size": 16},
        "neighbours": {"k": 3},
        "daf": {"max_overlap": None, "top_n": 3, "permutations": 10, "blind_rule": "quantile"},
        "tcac": {"transforms": ["grayscale"], "cases_per_transform": 2},
        "llm": {"dry_run": True},
        "report": {"daf_cases": 2, "blind_pairs": 2, "tcac_cases": 1, "examples_per_type": 2},
    }
    path = root / f"audit-{len(list(root.glob('audit-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def copy_run(run_dir: Path, root: Path, clip: list[str]) -> tuple[Path, Path]:
    """A copy of the audited run directory and a config pointing at it."""
    copy = root / "run"
    shutil.copytree(run_dir, copy)
    return copy, write_config(root, copy, clip)


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("provenance")
    run_dir = root / "run"
    assert main(["run", "--config", str(write_config(root, run_dir, [PROBE, FALLS_BACK])), "--stages", STAGES]) == 0
    return run_dir


def test_models_json_records_what_ran_and_the_weights_hash(audited: Path) -> None:
    recorded = json.loads((audited / "models.json").read_text())
    assert set(recorded["clip"]) == {PROBE, FALLS_BACK} and set(recorded["reference"]) == {REFERENCE}
    probe = recorded["clip"][PROBE]
    assert probe["requested"] == probe["ran"] == PROBE and probe["fallback"] is False and probe["random"] is False
    assert probe["weights_sha256"] == sha256(WEIGHTS / "probe-clip.safetensors")
    fallback = recorded["clip"][FALLS_BACK]
    assert fallback["requested"] == FALLS_BACK and fallback["ran"] == "tiny-clip"
    assert fallback["fallback"] is True and fallback["random"] is True and fallback["weights_sha256"] is None
    assert recorded["reference"][REFERENCE]["weights_sha256"] == sha256(WEIGHTS / "probe-dino.safetensors")


def test_summary_leaderboard_and_report_carry_it(audited: Path) -> None:
    recorded = read_models(str(audited))
    summary = json.loads((audited / "summary.json").read_text())
    assert summary["provenance"] == recorded
    for spec in (PROBE, FALLS_BACK):
        own = summary["per_model"][spec]["provenance"]
        assert own == {"clip": {spec: recorded["clip"][spec]}, "reference": recorded["reference"]}

    board = {row["clip_model"]: row for row in RunTables(str(audited)).read("leaderboard").to_pylist()}
    assert set(board) == {PROBE, FALLS_BACK}
    assert board[PROBE]["model_ran"] == PROBE and board[PROBE]["weights_sha256"] == sha256(
        WEIGHTS / "probe-clip.safetensors")
    assert board[FALLS_BACK]["model_ran"] == "tiny-clip" and board[FALLS_BACK]["weights_sha256"] is None
    assert all(row["revision"] is None for row in board.values())
    assert {row["clip_model"]: row["model_ran"] for row in summary["leaderboard"]} == {
        PROBE: PROBE, FALLS_BACK: "tiny-clip"}

    index = (audited / "report" / "index.html").read_text()
    assert f"{FALLS_BACK}</code></a> <strong class=\"fallback\">\u2192 ran tiny-clip (fallback, RANDOM)" in index
    assert sha256(WEIGHTS / "probe-clip.safetensors")[:12] in index
    pages = json.loads((audited / "stats" / "report.json").read_text())["notes"]["model_pages"]
    fallback_page = Path(pages[FALLS_BACK]).read_text()
    assert "FALLBACK, RANDOM" in fallback_page and sha256(WEIGHTS / "probe-dino.safetensors")[:12] in fallback_page
    probe_page = Path(pages[PROBE]).read_text()
    assert sha256(WEIGHTS / "probe-clip.safetensors")[:12] in probe_page and "FALLBACK" not in probe_page


def test_export_and_score_carry_it(audited: Path, tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    assert main(["export", str(audited), str(bench), "--llm", "off", "--clip-model", FALLS_BACK]) == 0
    manifest = json.loads((bench / "benchmark.json").read_text())
    provenance = manifest["source"]["provenance"]
    assert set(provenance["clip"]) == {FALLS_BACK} and provenance["clip"][FALLS_BACK]["ran"] == "tiny-clip"
    dino = sha256(WEIGHTS / "probe-dino.safetensors")
    assert provenance["reference"][REFERENCE]["weights_sha256"] == dino
    card = (bench / "README.md").read_text()
    assert f"| clip | `{FALLS_BACK}` | `tiny-clip` (fallback, random weights) |" in card
    assert f"| reference | `{REFERENCE}` | `{REFERENCE}` | - | `{dino}` |" in card

    out, results = tmp_path / "scores.json", tmp_path / "results"
    assert main(["score", str(bench), "--model", PROBE, "--runner", "local", "--json", str(out),
                 "--clip-benchmark-dir", str(results)]) == 0
    scored = json.loads(out.read_text())["models"][PROBE]["provenance"]
    assert scored["ran"] == PROBE and scored["weights_sha256"] == sha256(WEIGHTS / "probe-clip.safetensors")
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    assert records and all(record["clipaudit_provenance"] == scored and "metrics" in record for record in records)
    csv_path = tmp_path / "benchmark.csv"
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "clip_benchmark"), "build", str(results),
                           "--output", str(csv_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) and all(scored["weights_sha256"] in row["clipaudit_provenance"] for row in rows)


def test_a_resume_with_other_weights_is_refused_unless_it_is_a_new_run(audited: Path, tmp_path: Path,
                                                                       capsys) -> None:
    run_dir, config = copy_run(audited, tmp_path, [PROBE, FALLS_BACK])
    assert main(["run", "--config", str(config), "--stages", "ingest,embed"]) == 0
    assert read_models(str(run_dir)) == read_models(str(audited))

    recorded = json.loads((run_dir / "models.json").read_text())
    recorded["clip"][PROBE]["weights_sha256"] = "0" * 64
    (run_dir / "models.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--stages", "ingest,embed"]) == 2
    err = capsys.readouterr().err
    real = sha256(WEIGHTS / "probe-clip.safetensors")
    assert f"models.clip '{PROBE}'" in err and "0" * 64 in err and real in err
    assert "use a new run_dir" in err and "clipaudit run --new-run" in err and FALLS_BACK not in err
    assert json.loads((run_dir / "models.json").read_text()) == recorded, "a refused run writes nothing"
    assert main(["run", "--config", str(config), "--stages", "leaderboard,report"]) == 0, \
        "a run that resolves no model does not check"

    from clipaudit.config import load_config
    from clipaudit.pipeline import run_pipeline

    with pytest.raises(ModelsChangedError, match="probe-clip"):
        run_pipeline(load_config(str(config)), ["embed"])

    assert main(["run", "--config", str(config), "--stages", STAGES, "--new-run"]) == 0
    [previous] = list((run_dir / "previous").iterdir())
    assert {"lancedb", "stats", "models.json", "runs"} <= {p.name for p in previous.iterdir()}
    assert json.loads((previous / "models.json").read_text()) == recorded
    assert RunView(str(previous)).count("samples") == 12, "the earlier run reads back from its new place"
    assert read_models(str(run_dir)) == read_models(str(audited))
    assert RunTables(str(run_dir)).count("image_embeddings_clip") == 24
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["provenance"]["clip"][PROBE]["weights_sha256"] == real


def test_removing_a_model_drops_its_leaderboard_row(audited: Path, tmp_path: Path) -> None:
    run_dir, config = copy_run(audited, tmp_path, [PROBE, "tiny-clip"])
    assert main(["run", "--config", str(config), "--stages", "report"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(row["clip_model"], row["rank"]) for row in summary["leaderboard"]] == [(PROBE, 1)], \
        "a leaderboard table left by the earlier model list shows the run's models only"

    assert main(["run", "--config", str(config), "--stages", STAGES]) == 0
    board = RunTables(str(run_dir)).read("leaderboard").to_pylist()
    assert {row["clip_model"] for row in board} == {PROBE, "tiny-clip"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {row["clip_model"] for row in summary["leaderboard"]} == {PROBE, "tiny-clip"}
    assert set(summary["provenance"]["clip"]) == {PROBE, "tiny-clip"}
    recorded = read_models(str(run_dir))
    assert set(recorded["clip"]) == {PROBE, FALLS_BACK, "tiny-clip"}, "a removed model keeps its record"
    assert recorded["clip"]["tiny-clip"]["fallback"] is False and recorded["clip"]["tiny-clip"]["random"] is True
    assert run_provenance(str(run_dir), None, PROBE)["clip"] == {PROBE: recorded["clip"][PROBE]}


def test_a_remote_run_dir_is_told_to_use_a_new_run_dir(monkeypatch) -> None:
    from clipaudit import run_models

    monkeypatch.setattr(run_models, "has_earlier_run", lambda run_dir: True)
    with pytest.raises(run_models.NewRunError, match="on an object store use a new run_dir"):
        run_models.move_run_aside("s3://bucket/run")
    old = {"ran": PROBE, "weights_sha256": "a" * 64, "fallback": False}
    new = {"ran": "tiny-clip", "weights_sha256": None, "fallback": True, "source": "random (seeded)"}
    changed = run_models.changed_models({"clip": {PROBE: old}}, {"clip": {PROBE: new, "tiny-clip": new}})
    assert changed == [("clip", PROBE, old, new)], "a model not recorded yet is no change"
    message = run_models.changed_message("s3://bucket/run", changed)
    assert "a" * 64 in message and "ran 'tiny-clip' (fallback), no weight files (random (seeded))" in message
    assert message.endswith("To audit the new weights, use a new run_dir.") and "--new-run" not in message
