"""A normal run prints no warning lines except the random-models notice (the progress bars stay).

Each test runs ``clipaudit run`` in a fresh process and reads everything it wrote to stdout and stderr: Python
logging, Ray's driver and worker output, and the Rust (lance) and C++ (Ray core) loggers that write to the
file descriptors directly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NOISE = re.compile(r"\bWARN(ING)?\b|^\[\d{4}-\d\d-\d\d[ T][\d:.,]+Z? [WE] |\bTraceback\b")
"""A Python or Rust warning, a Ray core (C++) warning or error line, a traceback."""
ALLOWED = re.compile(r"(?i)findings are meaningless")
"""The random-models notice (the registry's per model, then the pipeline's RANDOM MODELS line)."""


def _run(tmp_path: Path, runner: str, stages: str) -> str:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "dataset": {"format": "synthetic", "num_images": 12, "seed": 0},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
        "embed": {"batch_size": 8},
        "ray": {"runner": runner, "num_cpus": 2},
        "neighbours": {"k": 5},
        "daf": {"permutations": 20},
        "tcac": {"transforms": ["grayscale", "hflip"], "cases_per_transform": 3},
        "llm": {"dry_run": True},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LANCE_LOG", "LANCEDB_LOG")}
    done = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", "--config", str(config), "--stages", stages],
                          capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _noise(output: str) -> list[str]:
    lines = re.split(r"[\r\n]+", output)
    return [line for line in lines if NOISE.search(line) and not ALLOWED.search(line)]


def test_noise_pattern_catches_each_kind_of_warning():
    samples = ["08:01:32 WARNING clipaudit.x: something",
               "[2026-11-29T08:02:18Z WARN  lance::dataset::write::insert] No existing dataset at x",
               "2026-11-29 08:01:34,228\tWARNING authentication_token_setup.py:85 -- Token authentication",
               "[2026-11-29 08:01:44,185 E 8072 8072] core_worker.cc:2465: Actor with class name",
               "\x1b[36m(MapWorker(MapBatches(ImageEncoder)) pid=1)\x1b[0m WARNING:root:No pretrained weights"]
    assert _noise("\n".join(samples)) == samples
    assert _noise("08:01:32 WARNING clipaudit: RANDOM MODELS: clip=tiny-clip (...). Their findings are meaningless\n"
                  "embed images: 100%|###| 12/12") == []


def test_a_local_run_prints_no_warnings(tmp_path):
    output = _run(tmp_path, "local", "ingest,embed,neighbours,daf,tcac,summarize,validate,report")
    assert _noise(output) == []
    assert "RANDOM MODELS" in output
    assert "12 in = 12 embedded + 0 rejected" in output


@pytest.mark.ray
def test_a_ray_run_prints_no_warnings(tmp_path):
    output = _run(tmp_path, "ray", "ingest,embed,neighbours,daf,tcac")
    assert _noise(output) == []
    assert "RANDOM MODELS" in output
