"""The autoscaling harness itself (autoscaler_helpers.py), with the v1 monitor and with autoscaler v2: a head with
0 CPUs and Ray's autoscaler over the fake multi-node provider; a submitted job's ``num_cpus=1`` task brings a worker
node up from 0, which goes away again once it has been idle for ``idle_timeout_minutes``. Every process of the
cluster is stopped by pid on exit, and none is left."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from autoscaler_helpers import FAKE_HEAD_NODE_ID, fake_autoscaling_cluster
from cluster_helpers import JOB_ENV, RAY

pytestmark = [pytest.mark.ray, pytest.mark.autoscaler]

JOB = """\
import json
import ray

ray.init(logging_level="ERROR")


@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()


print("TASK_NODE " + json.dumps(ray.get(where.remote(), timeout=120)))
"""


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_job_scales_up_from_zero_and_down_after_idle(tmp_path, v2):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    started = time.monotonic()
    with fake_autoscaling_cluster(tmp_path, worker_cpus=2, max_workers=2, idle_timeout_minutes=0.25,
                                  v2=v2) as cluster:
        assert cluster.worker_nodes() == 0
        submission_id = f"autoscaler-test-{uuid.uuid4().hex[:8]}"
        # No --working-dir: the fake nodes share the head's session folder; the script is named by absolute path.
        submit = subprocess.run(
            [str(RAY), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
             "--runtime-env-json", json.dumps({"env_vars": JOB_ENV}), "--", sys.executable, str(script)],
            env=cluster.env, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}"
        status = cluster.job_status(submission_id)
        assert status["status"] == "SUCCEEDED", status

        marker = [line for line in submit.stdout.splitlines() if line.startswith("TASK_NODE ")]
        assert marker, submit.stdout
        task_node = json.loads(marker[-1].split(" ", 1)[1])
        assert task_node != FAKE_HEAD_NODE_ID, "the task ran on the head, which has no CPUs"
        workers = {node["node_id"]: node for node in cluster.nodes() if not node["is_head_node"]}
        assert task_node in workers, f"the task's node {task_node} is not one of the workers {list(workers)}"
        assert workers[task_node]["resources_total"]["CPU"] == 2

        # Idle for 15 s (plus an autoscaler round or two): the worker is stopped.
        cluster.wait_for_workers(0, timeout_s=60)
        assert task_node in {node["node_id"] for node in cluster.nodes() if node["state"] == "DEAD"}
    assert not cluster.processes(), "no process of the cluster (head, client server, launched workers) is left"
    print(f"harness round trip ({'v2' if v2 else 'v1'}): {time.monotonic() - started:.1f} s")
