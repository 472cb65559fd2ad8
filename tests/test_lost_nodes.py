"""Lost nodes, under test: a second node of a two-node cluster (``ray start`` nodes on 127.0.0.1, see
cluster_helpers.py) has every one of its processes SIGKILLed in the middle of work, as a reclaimed spot instance
goes. The top-k actors, the LLM fan-out and the whole audit must finish with the result they give without the loss.

Each driver runs in a process of its own joined to the cluster (the session's local Ray, if any, is not disturbed);
the test process watches the work and kills the node when the work is known to be running on it (polled, not
timed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cluster_helpers import RayCluster, ray_cluster

pytestmark = pytest.mark.ray

SECOND = 1
"""The index of the node killed (the first node added to the head)."""


@pytest.fixture
def two_nodes() -> Iterator[RayCluster]:
    """A head and a second node of 2 CPUs each; stopped (by pid) after the test."""
    with ray_cluster(2, 2) as cluster:
        yield cluster


def driver_env(cluster: RayCluster) -> dict[str, str]:
    env = {**cluster.env}
    env.pop("RAY_ADDRESS", None)
    return env


class Killer(threading.Thread):
    """Kills node :data:`SECOND` of ``cluster`` once ``ready()`` says the work runs there (polled every 0.1 s);
    ``killed_at`` is then the ``time.monotonic()`` of the kill and ``pids`` the processes killed."""

    def __init__(self, cluster: RayCluster, ready: Callable[[], bool], timeout_s: float = 180) -> None:
        super().__init__(daemon=True)
        self.cluster, self.ready, self.timeout_s = cluster, ready, timeout_s
        self.killed_at: float | None = None
        self.pids: list[int] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while not self._halt.is_set() and time.monotonic() < deadline:
                if self.ready():
                    self.pids = self.cluster.kill_node(SECOND)
                    self.killed_at = time.monotonic()
                    return
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def node_pids(cluster: RayCluster, index: int) -> set[int]:
    return {p.pid for p in cluster.node_processes(index)}


def result_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, "the driver printed no result"
    return json.loads(lines[-1].removeprefix("RESULT "))


# --- top-k actors ---------------------------------------------------------------------------------------------

TOPK_DRIVER = textwrap.dedent(
    """
    import json, logging, os, sys, time

    import numpy as np
    import ray

    import clipaudit.runtime.topk as topk
    from clipaudit import knn
    from clipaudit.config import NeighboursConfig

    address, mode, marks, delay, cpus, workers = sys.argv[1:7]
    delay, cpus, workers = float(delay), float(cpus), int(workers)


    class PacedActor(topk._TopkActor):
        # The real actor, each unit held for `delay` s first (units of a few ms would be over before the node is
        # killed); each finished unit appends a byte to MARKS/<pid>, so the test sees where the units run.
        def _done(self):
            with open(os.path.join(marks, str(os.getpid())), "a") as f:
                f.write(".")

        def run_pairs(self, pairs):
            time.sleep(delay)
            out = super().run_pairs(pairs)
            self._done()
            return out

        def cross(self, *args):
            time.sleep(delay)
            out = super().cross(*args)
            self._done()
            return out


    topk._TopkActor = PacedActor
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3000:3300] = x[:300]  # exact duplicates: ties, whose order must hold too
    cfg = NeighboursConfig(ray_min_images=0, block_size=128, ray_cpus_per_worker=cpus, ray_workers=workers)
    search = topk.TopkSearch(cfg, lambda: None)
    started = time.monotonic()
    if mode == "self":
        ids, sims = search.self_topk(x, 8)
        ref_ids, ref_sims = knn.self_topk(x, 8, block_size=128)
    else:
        exclude = np.arange(4000) % 7 - 1
        ids, sims = search.cross_topk(x, x[::2], 6, exclude)
        ref_ids, ref_sims = knn.cross_topk(x, x[::2], 6, exclude=exclude, block_size=128)
    elapsed = time.monotonic() - started
    print("RESULT", json.dumps({"notes": search.notes, "elapsed_s": elapsed,
                                "ids": bool((ids == ref_ids).all()), "sims": bool((sims == ref_sims).all()),
                                "alive": sum(n["Alive"] for n in ray.nodes())}), flush=True)
    ray.shutdown()
    """
)


def run_topk_with_a_lost_node(cluster: RayCluster, tmp_path: Path, mode: str, delay_s: float, cpus: float,
                              workers: int, units_before_kill: int) -> tuple[dict, Killer, float]:
    """Run a top-k search of ``mode`` (self, cross) on ``cluster`` in a driver process; kill the second node once
    its actors have finished ``units_before_kill`` units. Returns the driver's result, the killer, the wall time."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def units_on_second_node() -> bool:
        pids = node_pids(cluster, SECOND)
        done = sum(mark.stat().st_size for mark in marks.iterdir() if int(mark.name) in pids)
        return done >= units_before_kill

    killer = Killer(cluster, units_on_second_node)
    killer.start()
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", TOPK_DRIVER, cluster.address, mode, str(marks), str(delay_s),
                               str(cpus), str(workers)], capture_output=True, text=True, timeout=300,
                              env=driver_env(cluster), cwd=tmp_path)
    finally:
        killer.stop()
    wall = time.monotonic() - started
    assert killer.error is None, killer.error
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return result_line(done.stdout), killer, wall, started, done.stderr


@pytest.mark.parametrize(("mode", "cpus", "workers"), [("self", 1.0, 4), ("cross", 0.5, 2)])
def test_topk_search_survives_a_lost_node(two_nodes: RayCluster, tmp_path: Path, mode: str, cpus: float,
                                          workers: int) -> None:
    """self: four actors of 1 CPU, two per node; the two lost cannot be replaced on the head (full), the two left
    do all the units again. cross: two actors of 0.5 CPU, one per node (SPREAD); the lost one's replacement fits on
    the head. Either way: the in-process ids and similarities, exactly."""
    result, killer, wall, started, err = run_topk_with_a_lost_node(two_nodes, tmp_path, mode, delay_s=0.1, cpus=cpus,
                                                     workers=workers, units_before_kill=3)
    notes = result["notes"]
    assert killer.killed_at is not None, f"the second node never ran a unit: {notes}"
    assert notes["where"] == "ray" and notes["nodes"] == 2, notes
    assert notes["actors_replaced"] >= 1, notes
    assert result["ids"] and result["sims"], "the in-process result, exactly"
    assert result["alive"] == 1
    print(f"{mode}: {notes}, search {result['elapsed_s']:.1f} s, test {wall:.1f} s, killed at {killer.killed_at - started:.1f}")
    print(err[-3000:])
