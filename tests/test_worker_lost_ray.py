"""A row that kills its model worker every time, on Ray: Ray retries it a bounded number of times, then the rows
behind the failed run are run again in halves until the poison row is alone; it becomes a ``worker_lost`` reject
and every other image is embedded. The run is a ``clipaudit run`` process of its own (its local Ray inherits
PYTHONPATH, so the actors can import the plug-in model from tests/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from clipaudit.io.tables import RunTables

pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent


def test_a_row_that_kills_its_worker_is_rejected_and_the_rest_is_embedded(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    colours = {"a": (200, 30, 30), "poison": (255, 0, 255), "b": (30, 200, 30)}
    lines = ["image,caption"]
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(images / f"{name}.png")
        lines.append(f"images/{name}.png,a square of colour {name}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "dataset": {"format": "manifest", "captions": str(tmp_path / "manifest.csv")},
        "models": {"clip": "tiny-clip", "reference": "python:poison_models:dies_on_magenta"},
        "embed": {"batch_size": 2, "max_reject_share": 0.5},
        "ray": {"num_cpus": 2, "task_retries": 0},
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", "--config", str(config),
                           "--stages", "ingest,embed,report"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "3 in = 2 embedded + 1 rejected" in done.stdout + done.stderr

    tables = RunTables(str(tmp_path / "run"))
    rejects = tables.read("rejects", ["item", "stage", "reason", "detail"], where="stage = 'embed'").to_pylist()
    assert [(r["reason"], "poison" in r["item"]) for r in rejects] == [("worker_lost", True)], rejects
    assert "worker" in rejects[0]["detail"]
    assert tables.count("image_embeddings_reference") == 2
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["counts"]
    assert (counts["rejects_retryable"], counts["rejects_final"]) == (1, 0)
    assert "retryable: tried again by the next run" in (tmp_path / "run" / "report" / "index.html").read_text()

    again = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", "--config", str(config),
                            "--stages", "embed"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    stats = json.loads((tmp_path / "run" / "stats" / "embed.json").read_text())
    assert stats["counts"]["retried"] == 1, "a worker_lost reject is tried again by the next run"
    rejects = tables.read("rejects", ["item", "reason"], where="stage = 'embed'").to_pylist()
    assert [(r["reason"], "poison" in r["item"]) for r in rejects] == [("kills_worker", True)], rejects
    assert tables.count("image_embeddings_reference") == 2
