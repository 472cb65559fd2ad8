"""The cluster path end to end on this machine: a Ray head of our own on 127.0.0.1 (``ray start --head``), the
whole audit submitted with ``ray job submit --working-dir`` (``jobs/audit.py``: a synthetic corpus of 12 images,
tiny models, Ray actors, the fake LLM endpoint), waited for, and its tables and report checked.

The head uses its own ports and temp folder, so it never meets the ``ray_local`` instance of the same pytest
session, and it is stopped by killing exactly the processes it started (found by its temp folder), never with a
machine-wide ``ray stop``, which would also stop every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from fake_openai import FakeOpenAI
from report_fixtures import fake_answer

from clipaudit.io.tables import RunTables
from clipaudit.runs import finished_runs

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
KEY_ENV = "CLIPAUDIT_JOB_TEST_KEY"
EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", "bench/results", "*.egg-info", "__pycache__"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the head started with ``temp_dir`` (their command line names it) and all their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                for p in [process, *process.children(recursive=True)]:
                    found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_head(temp_dir: str) -> None:
    """Terminate our head's processes by pid, then kill what is left."""
    processes = head_processes(temp_dir)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=3)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with its own ports and temp folder; yields the dashboard (job API) address."""
    gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, metrics, runtime_env = \
        free_ports(9)
    worker_low = 30000 + (os.getpid() % 200) * 100
    temp_dir = tempfile.mkdtemp(prefix="cray", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={worker_low}",
            f"--max-worker-port={worker_low + 99}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                    json.load(response)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address, env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head_processes(temp_dir) == [], "every process of the head is gone"


def job_status(address: str, submission_id: str) -> dict:
    with urllib.request.urlopen(f"{address}/api/jobs/{submission_id}", timeout=10) as response:
        return json.load(response)


def test_audit_submitted_as_a_ray_job(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
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
        submission_id = f"clipaudit-test-{uuid.uuid4().hex[:8]}"
        runtime_env = {"excludes": EXCLUDES,
                       "env_vars": {KEY_ENV: "sk-job-test", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                    "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}}
        submit = subprocess.run(
            [str(RAY), "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
             sys.executable, "jobs/audit.py", "--config", str(config_path)],
            env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        deadline = time.monotonic() + 240
        status = job_status(address, submission_id)
        while status["status"] not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(1.0)
            status = job_status(address, submission_id)
        logs = subprocess.run([str(RAY), "job", "logs", "--address", address, submission_id], env=env,
                              capture_output=True, text=True, timeout=60).stdout
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
