"""Lost nodes, under test: a second node of a two-node cluster (``ray start`` nodes on 127.0.0.1, see
cluster_helpers.py) has every one of its processes SIGKILLed in the middle of work, as a reclaimed spot instance
goes. The top-k actors, the LLM fan-out and the whole audit must finish with the result they give without the loss.

Each driver runs in a process of its own joined to the cluster (the session's local Ray, if any, is not disturbed);
the test process watches the work and kills the node when the work is known to be running on it (polled, not
timed).
"""

from __future__ import annotations

import json
import queue
import re
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
import yaml
from cluster_helpers import RayCluster, ray_env

pytestmark = pytest.mark.ray

HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                 "RAY_health_check_failure_threshold": "5"}
"""The GCS marks a node dead after about 5 s of missed health checks instead of 15 (Ray's defaults: every 3 s,
5 misses): the same path, less waiting."""


@pytest.fixture(scope="module")
def head() -> Iterator[RayCluster]:
    """A head of 2 CPUs, shared by the tests of this module (each adds its own second node); stopped by pid."""
    cluster = RayCluster(env=ray_env(HEALTH_CHECKS))
    try:
        cluster.start(2)
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "every process of the cluster is gone"


@pytest.fixture
def cluster(head: RayCluster) -> Iterator[RayCluster]:
    """``head`` plus a fresh second node of 2 CPUs (:func:`second`); after the test, that node is killed if it is
    still there, and the GCS has marked it dead (so that the next test plans on the head alone plus its own)."""
    head.add_node(2)
    wait_alive(head, 2)
    yield head
    if head.node_processes(second(head)):
        head.kill_node(second(head))
    wait_alive(head, 1)


def second(cluster: RayCluster) -> int:
    """The index of the second node: the one added last."""
    return len(cluster.node_dirs)


def wait_alive(cluster: RayCluster, n: int, timeout_s: float = 90) -> None:
    """Wait until the GCS reports exactly ``n`` nodes alive (asked through the dashboard's state API)."""
    deadline = time.monotonic() + timeout_s
    while (alive := cluster.node_states().count("ALIVE")) != n:
        assert time.monotonic() < deadline, f"{alive} nodes alive after {timeout_s} s, expected {n}"
        time.sleep(0.5)


def driver_env(cluster: RayCluster) -> dict[str, str]:
    env = {**cluster.env}
    env.pop("RAY_ADDRESS", None)
    return env


class Killer(threading.Thread):
    """Kills the second node of ``cluster`` (or runs ``kill``) once ``ready()`` says the work is under way (polled
    every 0.1 s); ``killed_at`` is then the ``time.monotonic()`` of the kill and ``pids`` the processes killed."""

    def __init__(self, cluster: RayCluster, ready: Callable[[], bool], timeout_s: float = 180,
                 kill: Callable[[], list[int]] | None = None) -> None:
        super().__init__(daemon=True)
        self.cluster, self.ready, self.timeout_s = cluster, ready, timeout_s
        self.kill = kill or (lambda: cluster.kill_node(second(cluster)))
        self.killed_at: float | None = None
        self.pids: list[int] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while not self._halt.is_set() and time.monotonic() < deadline:
                if self.ready():
                    self.pids = self.kill()
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
    exclude = np.arange(4000) % 7 - 1
    with topk.TopkSearch(cfg, lambda: None) as search:
        with search._pool_for_call() as pool:  # every actor up (no unit run) before the search starts
            ray.get([actor.load.remote(x[:10]) for actor in pool.actors])
        started = time.monotonic()
        if mode == "self":
            ids, sims = search.self_topk(x, 8)
        else:
            ids, sims = search.cross_topk(x, x[::2], 6, exclude)
        elapsed = time.monotonic() - started
    if mode == "self":
        ref_ids, ref_sims = knn.self_topk(x, 8, block_size=128)
    else:
        ref_ids, ref_sims = knn.cross_topk(x, x[::2], 6, exclude=exclude, block_size=128)
    print("RESULT", json.dumps({"notes": search.notes, "elapsed_s": elapsed,
                                "ids": bool((ids == ref_ids).all()), "sims": bool((sims == ref_sims).all())}),
          flush=True)
    ray.shutdown()
    """
)


def run_topk_with_a_lost_node(cluster: RayCluster, tmp_path: Path, mode: str, delay_s: float, cpus: float,
                              workers: int, units_before_kill: int) -> tuple[dict, Killer, Counter[int]]:
    """Run a top-k search of ``mode`` (self, cross) on ``cluster`` in a driver process; kill the second node once
    its actors have finished ``units_before_kill`` units. Returns the driver's result, the killer, and the units
    each actor process finished (by pid)."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def units() -> Counter[int]:
        return Counter({int(mark.name): mark.stat().st_size for mark in marks.iterdir()})

    def units_on_second_node() -> bool:
        pids = node_pids(cluster, second(cluster))
        return sum(n for pid, n in units().items() if pid in pids) >= units_before_kill

    killer = Killer(cluster, units_on_second_node)
    killer.start()
    try:
        done = subprocess.run([sys.executable, "-c", TOPK_DRIVER, cluster.address, mode, str(marks), str(delay_s),
                               str(cpus), str(workers)], capture_output=True, text=True, timeout=300,
                              env=driver_env(cluster), cwd=tmp_path)
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return result_line(done.stdout), killer, units()


def test_self_topk_survives_a_lost_node_with_no_room_for_replacements(cluster: RayCluster, tmp_path: Path) -> None:
    """Four top-k actors of 1 CPU, two per node (SPREAD). The second node goes after its actors finished units of
    their running top-k: those units and the ones in flight run again on the two actors left (the replacements
    cannot fit on the full head and never start); the result is the in-process one, ids, similarities, ties."""
    result, killer, units = run_topk_with_a_lost_node(cluster, tmp_path, "self", delay_s=0.05, cpus=1.0, workers=4,
                                                      units_before_kill=3)
    notes = result["notes"]
    assert killer.killed_at is not None, f"the second node never ran a unit: {notes}"
    assert notes["where"] == "ray" and notes["nodes"] == 2 and notes["units"] > 100, notes
    assert notes["actors_replaced"] >= 1 and notes["workers"] == 2, notes
    assert result["ids"] and result["sims"], "the in-process result, exactly"
    lost = sum(n for pid, n in units.items() if pid in killer.pids)
    assert lost >= 3 and sum(units.values()) >= notes["units"] + lost, "the lost actor's finished units ran again"
    print(f"self: {notes}; units per actor process {dict(units)}")


def test_cross_topk_survives_a_lost_node_and_a_replacement_takes_over(cluster: RayCluster, tmp_path: Path) -> None:
    """Two top-k actors of 0.5 CPU, one per node (SPREAD). The second node goes after its first unit; a replacement
    starts on the head (room is there) and takes units before the end; the result is the in-process one."""
    result, killer, units = run_topk_with_a_lost_node(cluster, tmp_path, "cross", delay_s=0.5, cpus=0.5, workers=2,
                                                      units_before_kill=1)
    notes = result["notes"]
    assert killer.killed_at is not None, f"the second node never ran a unit: {notes}"
    assert notes["where"] == "ray" and notes["nodes"] == 2, notes
    assert notes["actors_replaced"] >= 1, notes
    assert result["ids"] and result["sims"], "the in-process result, exactly"
    survivors = [pid for pid in units if pid not in killer.pids]
    assert len(survivors) == 2, f"the replacement ran units: {units}, lost {killer.pids}"
    assert notes["workers"] == 2, notes
    print(f"cross: {notes}; units per actor process {dict(units)}")


# --- LLM actors -----------------------------------------------------------------------------------------------

LLM_KEY = "sk-test-lost-nodes-0123456789"
LLM_REQUESTS = 40
LLM_IN_FLIGHT = 4
LLM_DRIVER = textwrap.dedent(
    """
    import json, logging, sys
    from collections import Counter

    import ray

    from clipaudit.config import load_config
    from clipaudit.llm.requests import LLMRequest
    from clipaudit.runtime.llm_actors import map_llm_ray

    address, base_url, key, n, workers, in_flight = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    config = load_config(None, [f"llm.base_url={base_url}", "llm.model=gpt-4o-mini", f"llm.workers={workers}",
                                f"llm.max_in_flight={in_flight}", "llm.timeout_s=30", "llm.max_retries=0"])
    requests = [LLMRequest("gpt-4o-mini", [{"role": "user", "content": f"request {i}"}], {"temperature": 0.0})
                for i in range(int(n))]
    results = [r for chunk in map_llm_ray(requests, config.llm, key, None) for r in chunk]
    print("RESULT", json.dumps({"ids": sorted(r.request_id for r in results),
                                "expected": sorted(r.request_id for r in requests),
                                "status": Counter(r.status for r in results)}), flush=True)
    ray.shutdown()
    """
)


def llm_worker_pids(cluster: RayCluster) -> list[int]:
    """The processes of the LLM worker actors (process title ``ray::_LLMWorkerActor...``) on ``cluster``."""
    found = []
    for process in cluster.processes():
        try:
            if " ".join(process.cmdline()).startswith("ray::_LLMWorkerActor"):
                found.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def run_llm_fanout(cluster: RayCluster, tmp_path: Path, kill: Callable[[], list[int]] | None,
                   calls_before_kill: int, workers: int) -> tuple[dict, Killer, list]:
    """``map_llm_ray`` of :data:`LLM_REQUESTS` requests over ``workers`` worker actors from a driver process on
    ``cluster`` against a fake endpoint answering in 0.4 s (:data:`LLM_IN_FLIGHT` in flight: about 4 s in all);
    ``kill`` runs once the endpoint has seen ``calls_before_kill`` calls. Returns the driver's result, the killer
    and the endpoint's calls."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI(latency_s=0.4, api_key=LLM_KEY) as server:
        killer = Killer(cluster, lambda: len(server.snapshot()) >= calls_before_kill, kill=kill)
        killer.start()
        try:
            done = subprocess.run([sys.executable, "-c", LLM_DRIVER, cluster.address, server.base_url, LLM_KEY,
                                   str(LLM_REQUESTS), str(workers), str(LLM_IN_FLIGHT)], capture_output=True,
                                  text=True, timeout=120,
                                  env=driver_env(cluster), cwd=tmp_path)
        finally:
            killer.stop()
        calls = server.snapshot()
    assert killer.error is None, killer.error
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return result_line(done.stdout), killer, calls


def test_llm_fanout_pays_no_request_twice_when_a_node_is_lost(cluster: RayCluster, tmp_path: Path) -> None:
    """The LLM actors are pinned to the driver's node (the head): the second node lost mid-fan-out takes no
    request with it; every result comes back and the endpoint saw each request exactly once."""
    on_second: list[int] = []

    def kill() -> list[int]:
        on_second.extend(set(llm_worker_pids(cluster)) & node_pids(cluster, second(cluster)))
        return cluster.kill_node(second(cluster))

    result, killer, calls = run_llm_fanout(cluster, tmp_path, kill, calls_before_kill=12, workers=2)
    assert killer.killed_at is not None and killer.pids, "the second node was killed"
    assert not on_second, "no LLM worker actor ran on the second node"
    assert result["ids"] == result["expected"] and result["status"] == {"ok": LLM_REQUESTS}
    assert any(call.t > killer.killed_at for call in calls), "the kill came mid-fan-out"
    sent = Counter(call.prompt for call in calls)
    assert len(sent) == LLM_REQUESTS and set(sent.values()) == {1}, f"each request sent once: {sent}"


def test_llm_fanout_replaces_a_killed_worker_actor(head: RayCluster, tmp_path: Path) -> None:
    """The one LLM worker actor's process SIGKILLed mid-fan-out, with leases of the shared budget in flight: its
    chunks go to a new worker, which gets those in-flight slots back at once (they used to stay taken for the
    budget's lease TTL, 15 minutes: the fan-out stalled), and every result comes back. Only requests the lost worker
    had sent, of its chunks not yet back, are sent again: about one chunk plus the requests in flight."""
    from clipaudit.runtime.llm_actors import LLM_CHUNK

    # A worker of the previous test's driver may still be exiting on the shared head: it is not the victim.
    earlier = set(llm_worker_pids(head))

    def kill() -> list[int]:
        (victim,) = set(llm_worker_pids(head)) - earlier
        psutil.Process(victim).kill()
        return [victim]

    result, killer, calls = run_llm_fanout(head, tmp_path, kill, calls_before_kill=12, workers=1)
    assert killer.killed_at is not None and killer.pids, "the worker actor was killed"
    assert result["ids"] == result["expected"] and result["status"] == {"ok": LLM_REQUESTS}
    sent = Counter(call.prompt for call in calls)
    assert len(sent) == LLM_REQUESTS and max(sent.values()) <= 2, sent
    before = {call.prompt for call in calls if call.t < killer.killed_at}
    twice = {prompt for prompt, n in sent.items() if n > 1}
    assert twice <= before, "only requests sent before the kill are sent again"
    assert len(twice) <= LLM_CHUNK + LLM_IN_FLIGHT - 1, f"{len(twice)} requests sent twice: {sorted(twice)}"
    after = [call.t - killer.killed_at for call in calls if call.t >= killer.killed_at]
    assert after[-1] < 30, f"the fan-out took {after[-1]:.0f} s after the kill: in-flight slots lost"
    print(f"sent twice: {len(twice)}; calls {len(calls)}; {after[-1]:.1f} s after the kill")


# --- the whole audit ------------------------------------------------------------------------------------------

AUDIT_IMAGES = 120
PROGRESS = re.compile(r"(embed images|tcac images):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def audit_config(run_dir: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "dataset": {"format": "synthetic", "num_images": AUDIT_IMAGES, "seed": 3},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
        "embed": {"batch_size": 4, "actors_per_model": 2, "cpus_per_actor": 0.5},
        "neighbours": {"k": 2},
        "daf": {"max_overlap": None, "top_n": 3, "permutations": 10},
        "tcac": {"transforms": ["grayscale", "hflip"], "cases_per_transform": 2},
        "llm": {"dry_run": True},
        "report": {"daf_cases": 2, "tcac_cases": 1},
    }


def test_audit_survives_a_node_lost_in_embed_and_another_in_tcac(cluster: RayCluster, tmp_path: Path) -> None:
    """``clipaudit run`` (every stage, tiny models, LLM dry run) as a driver joined to two nodes. The second node is
    killed once the embed stage's first images are back (a model actor is there: Ray Data spreads the pool's two
    actors); a fresh node joins, and is killed in turn once the TCAC stage's first images are back. Every image is
    embedded once per model, neighbours and TCAC rows are complete, nothing is rejected, and the run says the node
    loss was handled (the rows not back ran again)."""
    from clipaudit.io.tables import RunTables

    run_dir = tmp_path / "run"
    config_path = tmp_path / "audit.yaml"
    config_path.write_text(yaml.safe_dump(audit_config(run_dir)))
    command = [str(Path(sys.executable).with_name("clipaudit")), "run", "--config", str(config_path),
               "--set", f"ray.address={cluster.address}"]
    process = subprocess.Popen(command, env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=tmp_path)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put(None)], daemon=True)
    reader.start()
    output: list[str] = []
    events: list[str] = []
    started = time.monotonic()
    killed: dict[str, list[str]] = {}
    joining: threading.Thread | None = None
    deadline = time.monotonic() + 400
    try:
        while (line := lines.get(timeout=max(1.0, deadline - time.monotonic()))) is not None:
            output.append(line)
            if "INFO clipaudit: stage" in line or "WARNING clipaudit.runtime" in line:
                events.append(f"{time.monotonic() - started:.0f} s {line.strip()[9:90]}")
            found = PROGRESS.search(line)
            if not found or not 0 < int(found.group(2)) < int(found.group(3)):
                continue
            stage = found.group(1).split()[0]
            if stage in killed or (stage == "tcac" and "embed" not in killed):
                continue
            if joining is not None:
                joining.join()
            node = second(cluster)
            killed[stage] = titles(cluster.node_processes(node))
            cluster.kill_node(node)
            events.append(f"{time.monotonic() - started:.0f} s killed the node mid-{stage} ({found.group(2)} done)")
            if stage == "embed":
                joining = threading.Thread(target=cluster.add_node, args=(2,))
                joining.start()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        if joining is not None:
            joining.join()
    log = "".join(output)
    assert process.returncode == 0, log[-8000:]
    assert set(killed) == {"embed", "tcac"}, f"a node was killed mid-stage in: {sorted(killed)}\n{log[-4000:]}"
    assert any("ImageEncoder" in title for title in killed["embed"]), f"an embed model actor was lost: {killed}"
    assert "WARNING clipaudit.runtime: node lost" in log, "the embed stage saw the node loss and ran its rows again"
    assert f"{AUDIT_IMAGES} in = {AUDIT_IMAGES} embedded + 0 rejected" in log
    assert f"tcac: {AUDIT_IMAGES} in = {AUDIT_IMAGES} scored + 0 rejected" in log

    tables = RunTables(str(run_dir))
    samples = set(tables.read("samples", ["image_id"]).column("image_id").to_pylist())
    assert len(samples) == AUDIT_IMAGES
    for role in ("clip", "reference"):
        ids = Counter(tables.read(f"image_embeddings_{role}", ["image_id"]).column("image_id").to_pylist())
        assert set(ids) == samples and set(ids.values()) == {1}, f"{role}: every image once"
    neighbours = Counter(tables.read("neighbours", ["image_id"]).column("image_id").to_pylist())
    assert set(neighbours) == samples and set(neighbours.values()) == {2}, "a row per image and model"
    cases = tables.read("tcac_cases", ["image_id", "transform"]).to_pylist()
    assert Counter((c["image_id"], c["transform"]) for c in cases) == {
        (image, transform): 1 for image in samples for transform in ("grayscale", "hflip")}
    rejects = tables.read("rejects", ["stage", "reason", "item"]).to_pylist()
    assert not [r for r in rejects if r["stage"] in ("embed", "tcac")], rejects
    print(f"killed mid-embed: {killed['embed']}; mid-tcac: {killed['tcac']}; "
          f"node losses handled: {log.count('clipaudit.runtime: node lost')}; run {time.monotonic() - started:.0f} s")
    print("\n".join(events))


def titles(processes: list[psutil.Process]) -> list[str]:
    """The Ray process titles (``ray::...``) among ``processes``."""
    found = []
    for process in processes:
        try:
            title = " ".join(process.cmdline()).strip()
        except psutil.NoSuchProcess:
            continue
        if title.startswith("ray::"):
            found.append(title)
    return found
