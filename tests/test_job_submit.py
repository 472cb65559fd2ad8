"""The cluster path end to end on this machine: a Ray head of our own on 127.0.0.1 (``ray start --head``), the
whole audit submitted with ``ray job submit --working-dir`` (``jobs/audit.py``: a synthetic corpus of 12 images,
tiny models, Ray actors, the fake LLM endpoint), waited for, and its tables and report checked.

The head uses its own ports and temp folder (cluster_helpers.py: ports from a range that overlaps neither the
OS's ephemeral ports nor Ray's default worker ports), so it never meets the ``ray_local`` instance of the same
pytest session, and it is stopped by killing exactly the processes it started, never with a machine-wide
``ray stop``, which would also stop every other Ray on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cluster_helpers import ray_cluster, submit_audit
from fake_openai import FakeOpenAI
from report_fixtures import fake_answer

from clipaudit.io.tables import RunTables
from clipaudit.runs import finished_runs

pytestmark = pytest.mark.ray

KEY_ENV = "CLIPAUDIT_JOB_TEST_KEY"


@pytest.fixture
def cluster():
    """A Ray head of 2 CPUs on 127.0.0.1 with its own ports and temp folder."""
    with ray_cluster(2) as head:
        yield head


def test_audit_submitted_as_a_ray_job(cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeOpenAI(answer=fake_answer(0)) as server:
        config = {
            "run_dir": str(run_dir),
            "dataset": {"format": "synthetic", "num_images": 12, "seed": 3},
            "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
            "embed": {"batch_size": 16, "actors_per_model": 1, "cpus_per_actor": 0.25},
            "neighbours": {"k": 4},
            "daf": {"max_overlap": None, "top_n": 3, "permutations": 10},
            "tcac": {"transforms": ["grayscale", "hflip"], "cases_per_transform": 2},
            "llm": {"base_url": server.base_url, "api_key_env": KEY_ENV, "model": "gpt-4o-mini", "workers": 1,
                    "max_cases": 3, "timeout_s": 10, "max_retries": 1},
            "validate": {"pairs_per_type": 2},
            "report": {"daf_cases": 2, "tcac_cases": 1},
        }
        config_path = tmp_path / "audit.yaml"
        config_path.write_text(yaml.safe_dump(config))
        status, logs = submit_audit(cluster, config_path, {KEY_ENV: "sk-job-test"}, timeout_s=240)
        assert status["status"] == "SUCCEEDED", f"{status.get('message')}\n{logs[-6000:]}"
        assert len(server.answered()) >= 2, "the job's driver reached the fake LLM endpoint"

    tables = RunTables(str(run_dir))
    assert tables.count("samples") == 12
    assert tables.count("image_embeddings_clip") == tables.count("image_embeddings_reference") == 12
    assert tables.count("neighbours") == 24
    assert tables.count("daf_cases") == 3
    assert tables.count("tcac_cases") == 24 and tables.count("tcac_summary") == 2
    assert tables.count("failure_types") > 0 and tables.count("failure_checks") > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["embedded"] == 12 and summary["random_models"] is True
    assert all(info["ran"] for stage, info in summary["stages"].items() if stage != "report")
    assert summary["run_id"] == finished_runs(str(run_dir))[-1]
    assert summary["run_id"] in tables.tags("failure_types"), "the job's run tagged the tables it wrote"
    html = (run_dir / "report" / "index.html").read_text()
    assert "<script" not in html and "daf-case" in html and 'data-transform="hflip"' in html
    assert "model actors on" in logs, "the driver scheduled its model work on the cluster's Ray"
