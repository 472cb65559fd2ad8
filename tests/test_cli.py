"""The command line end to end: `clipaudit run` on the demo config through local Ray, re-run, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipaudit.cli import main
from clipaudit.io.tables import RunTables
from clipaudit.records import CAPTION_EMBEDDINGS, IMAGE_EMBEDDINGS, SAMPLES

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def demo_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, "--set", f"run_dir={run_dir}", "--set", "dataset.num_images=12",
            "--set", "models.clip=tiny-clip", "--set", "models.reference=tiny-dino", *extra]


@pytest.mark.ray
def test_run_ingest_and_embed_on_local_ray_then_rerun(tmp_path, ray_local, capsys):
    run_dir = tmp_path / "demo"
    assert main(["run", *demo_args(run_dir), "--stages", "ingest,embed"]) == 0
    assert "12 in = 12 embedded + 0 rejected" in capsys.readouterr().out
    tables = RunTables(str(run_dir))
    counts = {name: tables.count(name) for name in
              (SAMPLES, IMAGE_EMBEDDINGS["clip"], IMAGE_EMBEDDINGS["reference"], CAPTION_EMBEDDINGS)}
    assert counts[SAMPLES] == counts[IMAGE_EMBEDDINGS["clip"]] == counts[IMAGE_EMBEDDINGS["reference"]] == 12
    assert counts[CAPTION_EMBEDDINGS] >= 3 * 12
    assert (run_dir / "config.resolved.yaml").is_file()
    stats = json.loads((run_dir / "stats" / "embed.json").read_text())
    assert stats["notes"]["random_models"] is True and stats["notes"]["device"] == "cpu"
    assert {"read", "decode", "infer_clip", "infer_reference", "infer_text", "write", "wall"} <= set(stats["seconds"])

    assert main(["embed", *demo_args(run_dir)]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert {name: tables.count(name) for name in counts} == counts


def test_fallback_is_announced_as_random(tmp_path, capsys):
    args = ["--config", DEMO, "--set", f"run_dir={tmp_path / 'r'}", "--set", "dataset.num_images=4",
            "--set", "ray.runner=local", "--set", "models.clip=open_clip:ViT-B-32/openai"]
    assert main(["run", *args, "--stages", "ingest,embed"]) == 0
    stats = json.loads((tmp_path / "r" / "stats" / "embed.json").read_text())
    assert stats["notes"]["random_models"] is True
    assert stats["notes"]["models"]["clip"] == "tiny-clip"


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "embed.batchsize=3"], "unknown key embed.batchsize"),
    (["--stages", "ingest,reprot"], "unknown stage 'reprot'"),
    (["--set", "models.fallback=none", "--set", "models.clip=open_clip:ViT-B-32/openai", "--stages", "embed"],
     "open_clip:ViT-B-32/openai"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(["run", "--config", DEMO, "--set", f"run_dir={tmp_path}", *extra]) == 2
    assert message in capsys.readouterr().err


def test_job_entry_point_runs_the_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "audit.py"), *demo_args(tmp_path / "job"), "--set", "ray.runner=local",
         "--set", "dataset.num_images=3", "--stages", "ingest,embed"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 in = 3 embedded + 0 rejected" in result.stdout
