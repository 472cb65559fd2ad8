"""Exact top-k on a two-node Ray cluster (ray.cluster_utils.Cluster: a head and a second node of 1 CPU each,
started and shut down by the test, in a subprocess so that the session's local Ray is not disturbed): one
top-k actor per node, and the ids and similarities of the in-process search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent(
    """
    import json

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from clipaudit import knn
    from clipaudit.config import NeighboursConfig
    from clipaudit.runtime import TopkSearch

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2000, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x[1500:1700] = x[:200]
        exclude = np.arange(400)
        with TopkSearch(NeighboursConfig(ray_min_images=0, block_size=256), lambda: None) as search:
            search.self_topk(x[:300], 3)
            ray.get([actor.load.remote(x[:10]) for actor in search._pool.actors])  # both actors up: both get work
            ids, sims = search.self_topk(x, 8)
            self_notes = dict(search.notes)
            cross_ids, cross_sims = search.cross_topk(x[:400], x, 5, exclude)
        ref_ids, ref_sims = knn.self_topk(x, 8, block_size=256)
        ref_cross_ids, ref_cross_sims = knn.cross_topk(x[:400], x, 5, exclude=exclude, block_size=256)
        print("RESULT", json.dumps({
            "nodes_alive": sum(node["Alive"] for node in ray.nodes()),
            "notes": self_notes,
            "self_ids": bool((ids == ref_ids).all()),
            "self_sims": bool((sims == ref_sims).all()),
            "cross_ids": bool((cross_ids == ref_cross_ids).all()),
            "cross_sims": bool((cross_sims == ref_cross_sims).all()),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_two_node_cluster_gives_the_in_process_result(tmp_path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["nodes_alive"] == 2
    assert result["notes"]["where"] == "ray"
    assert result["notes"]["workers"] == 2 and result["notes"]["nodes"] == 2
    assert result["self_ids"] and result["self_sims"]
    assert result["cross_ids"] and result["cross_sims"]
