"""Defaults that fit the machine, and placement failures that are not row failures, on one local Ray of 2 CPUs.

The leaderboard config (three CLIP models and a reference) in pools of their own (``embed.actor_pools:
per_model``: four model actors in the embed stage) with a CPU share the user set to 0.5 leaves no CPU for decoding:
the run is refused before any work, with the reason, and no image becomes a reject (it used to write every image as
``worker_lost``). The same run_dir, run again with the default share, completes: the planner lowers the share until
the four actors and a decode task fit. (With the default shared pool the four models are one actor, which fits.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipaudit.io.tables import RunTables

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
IMAGES = 24


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "clipaudit.cli", "run", "--config", str(REPO / "configs" / "leaderboard.yaml"),
         "--stages", "ingest,embed,neighbours,daf,tcac,leaderboard", "--set", f"run_dir={run_dir}",
         "--set", "ray.num_cpus=2", "--set", f"dataset.num_images={IMAGES}", *overrides],
        capture_output=True, text=True, env=env, timeout=900)


def test_leaderboard_config_refused_with_a_set_share_then_runs_with_defaults(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    refused = run(run_dir, "--set", "embed.actor_pools=per_model", "--set", "embed.cpus_per_actor=0.5")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-4000:]
    assert "after its 4 model actor(s) of 0.5 CPU each, no node has CPU left for the decode tasks" in refused.stderr
    assert RunTables(str(run_dir)).count("rejects") == 0, "a placement error is not a row reject"

    done = run(run_dir, "--set", "embed.actor_pools=per_model")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "CPU share lowered to 0.25" in output
    assert f"{IMAGES} in = {IMAGES} embedded + 0 rejected" in output
    tables = RunTables(str(run_dir))
    assert tables.count("rejects") == 0
    assert tables.count("image_embeddings_clip") == 3 * IMAGES
    assert tables.count("image_embeddings_reference") == IMAGES
    leaderboard = tables.read("leaderboard", ["clip_model", "rank"]).to_pylist()
    assert sorted(row["rank"] for row in leaderboard) == [1, 2, 3]
    embed_stats = json.loads((run_dir / "stats" / "embed.json").read_text())
    assert embed_stats["counts"]["total_rejected"] == 0
