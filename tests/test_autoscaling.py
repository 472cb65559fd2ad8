"""The audit on an autoscaling cluster that starts with no workers, as the project ships it (a head with 0 CPUs,
CPU workers with ``min_workers: 0``): Ray's own autoscaler over its fake multi-node provider (autoscaler_helpers.py),
v1 and v2. The audit is submitted with ``ray job submit``; the plan asks the autoscaler for its nodes and waits,
the workers come up, the job completes, it holds nothing at the end, and the workers go away. A plan that no node
type could ever hold is refused at once, before anything is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from autoscaler_helpers import FakeAutoscalingCluster, fake_autoscaling_cluster
from cluster_helpers import JOB_ENV, RAY, REPO

pytestmark = [pytest.mark.ray, pytest.mark.autoscaler]

IMAGES = 24
ALL_STAGES = "ingest,embed,neighbours,daf,tcac,summarize,validate,leaderboard,report"

HOLDINGS = """\
import json, sys
import ray
from ray.util.state import list_actors, list_placement_groups
ray.init(address=sys.argv[1], logging_level="ERROR")
from ray.autoscaler.v2.sdk import get_cluster_status
status = get_cluster_status(ray.get_runtime_context().gcs_address)
demands = status.resource_demands
print("HOLDINGS " + json.dumps({
    "actors": [[a.class_name, a.node_id] for a in list_actors(address=sys.argv[2], filters=[("state", "=", "ALIVE")])],
    "placement_groups": [p.name for p in list_placement_groups(address=sys.argv[2]) if p.state != "REMOVED"],
    "demands": [str(d) for d in (*demands.placement_group_demand, *demands.ray_task_actor_demand,
                                 *(c for c in demands.cluster_constraint_demand if c.bundles_by_count))],
}))
"""
RAY_DATA_SINGLETONS = {"_AutoscalingCoordinatorActor", "_StatsActor", "ActorLocationTracker"}
"""Ray Data's own detached singletons (0 CPU, on the head): Ray's, shared by every job of the cluster; they hold no
worker node."""


def write_config(folder: Path, **overrides: object) -> Path:
    config = {
        "run_dir": str(folder / "run"),
        "dataset": {"format": "synthetic", "num_images": IMAGES, "seed": 3},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
        "embed": {"batch_size": 8},
        "neighbours": {"k": 4},
        "daf": {"max_overlap": None, "top_n": 3, "permutations": 10},
        "tcac": {"transforms": ["grayscale", "hflip"], "cases_per_transform": 2},
        "llm": {"dry_run": True},
        "report": {"daf_cases": 2, "tcac_cases": 1},
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(cluster: FakeAutoscalingCluster, config: Path, *args: str, timeout_s: float = 420) -> tuple[dict, str]:
    """``ray job submit`` of jobs/audit.py (no --working-dir: the fake nodes share the head's session folder, so the
    script and config are named by absolute path); returns the job's status and logs."""
    submission_id = f"autoscaling-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(RAY), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
         "--runtime-env-json", json.dumps({"env_vars": JOB_ENV}), "--", sys.executable,
         str(REPO / "jobs" / "audit.py"), "--config", str(config), *args],
        env=cluster.env, capture_output=True, text=True, timeout=timeout_s)
    return cluster.job_status(submission_id), done.stdout + done.stderr


def holdings(cluster: FakeAutoscalingCluster) -> dict:
    """What the cluster still holds for anyone: live actors, placement groups, pending resource demands."""
    done = subprocess.run([sys.executable, "-c", HOLDINGS, cluster.address, cluster.dashboard_url], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "HOLDINGS " in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("HOLDINGS "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_audit_from_zero_workers_scales_up_completes_and_scales_down(tmp_path: Path, v2: bool) -> None:
    stages = ALL_STAGES if not v2 else "ingest,embed,neighbours,daf"
    with fake_autoscaling_cluster(tmp_path, worker_cpus=2, max_workers=2, idle_timeout_minutes=0.25,
                                  v2=v2) as cluster:
        assert cluster.worker_nodes() == 0

        refused_config = write_config(tmp_path / "refused", run_dir=str(tmp_path / "refused" / "run"))
        started = time.monotonic()
        status, logs = submit(cluster, refused_config, "--set", "embed.cpus_per_actor=3", "--stages",
                              "ingest,embed")
        assert status["status"] == "FAILED", status
        assert "needs 3 CPU on one node" in logs and "cpu_worker" in logs, logs[-3000:]
        assert time.monotonic() - started < 90, "a plan no node type can hold is refused without waiting"
        assert cluster.worker_nodes() == 0, "nothing was asked of the autoscaler for it"

        config = write_config(tmp_path)
        submitted = time.time()
        status, logs = submit(cluster, config, "--stages", stages)
        assert status["status"] == "SUCCEEDED", f"{status}\n{logs[-6000:]}"
        assert "asking the autoscaler for" in logs and "the autoscaler delivered" in logs, logs[-4000:]
        assert f"{IMAGES} in = {IMAGES} embedded + 0 rejected" in logs

        embed = json.loads((tmp_path / "run" / "stats" / "embed.json").read_text())
        to_first = embed["notes"]["first_image_at"] - submitted
        print(f"autoscaler {'v2' if v2 else 'v1'}: {to_first:.1f} s from submit to the first embedded image")
        assert 0 < to_first < 300

        from clipaudit.io.tables import RunTables

        tables = RunTables(str(tmp_path / "run"))
        assert tables.count("image_embeddings_clip") == tables.count("image_embeddings_reference") == IMAGES
        assert tables.count("neighbours") == 2 * IMAGES
        assert tables.count("rejects") == 0
        if not v2:
            assert tables.count("tcac_cases") == 2 * IMAGES
            assert (tmp_path / "run" / "report" / "index.html").stat().st_size > 0

        held = holdings(cluster)
        head = next(node["node_id"] for node in cluster.nodes() if node["is_head_node"])
        assert all(name in RAY_DATA_SINGLETONS and node == head for name, node in held["actors"]), held
        assert held["placement_groups"] == [], held
        deadline = time.monotonic() + 60
        while held["demands"] and time.monotonic() < deadline:
            time.sleep(2)  # Ray Data's coordinator withdraws its own request on its next round (20 s)
            # (a withdrawn request stays listed as a constraint of no bundles: nothing is asked for then)
            held = holdings(cluster)
        assert held["demands"] == [], held
        cluster.wait_for_workers(0, timeout_s=120)
    assert not cluster.processes()
