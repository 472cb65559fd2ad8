"""bench/gpu.py runs to the end on the CPU (tiny models, smallest sizes) and writes every section's ratios."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_bench_gpu_runs_on_cpu_and_writes_positive_ratios(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--clip", "tiny-clip", "--reference", "tiny-dino",
         "--images", "4", "--batch-size", "2", "--tcac-images", "2", "--tcac-batch", "8", "--knn-n", "300",
         "--knn-queries", "50", "--knn-dim", "32", "--k", "5", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["measured_on"]["device"] == "cpu"
    assert result["measured_on"]["dtype"] == "float32"
    assert result["measured_on"]["torch"]
    assert set(result["ratios"]) == {"embed_clip", "embed_reference", "tcac", "knn_self", "knn_cross"}
    for name, value in result["ratios"].items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    for role in ("clip", "reference"):
        embed = result["embed"][role]
        assert embed["project_img_per_s"] > 0 and embed["bare_img_per_s"] > 0
        assert embed["rejected_rows_timed"] == 0
        assert embed["min_cosine_project_vs_bare"] > 0.999  # the bare loop computes the same vectors
    assert result["tcac"]["rows"] == 2 * len(result["tcac"]["transforms"]) == 14
    assert result["tcac"]["rejected_rows_timed"] == 0
    assert result["tcac"]["min_cosine_project_vs_bare"] > 0.999
    for kind in ("self", "cross"):
        knn = result["knn"][kind]
        assert knn["project_queries_per_s"] > 0 and knn["bare_queries_per_s"] > 0
        assert knn["id_overlap_project_vs_bare"] > 0.99  # fp32 on the CPU: both exact
    assert "measured on cpu" in done.stdout
    assert "project/bare" in done.stdout
