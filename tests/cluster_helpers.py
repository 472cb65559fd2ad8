"""Servers and Ray clusters of the tests' own, on 127.0.0.1, that cannot collide with each other or with the OS.

Ports come from :data:`PORT_RANGE` (20000-29999), which overlaps neither the OS's ephemeral range
(32768-60999, where every ``bind(("127.0.0.1", 0))`` lands: the fake LLM server, chromium's DevTools) nor
Ray's default worker-port range (10002-19999, used by the ``ray_local`` fixture's ``ray.init``). The range is cut
into blocks of :data:`BLOCK` ports; a node takes one block for its service ports *and* its worker ports, so the two
never meet. Blocks are reserved across processes with a lock file per block in :data:`LOCK_DIR` (several pytest
sessions may run at once on one machine), and each port of a block is checked free by binding it.

:class:`RayCluster` starts ``ray start`` nodes (a head plus workers, each with its own block and the head's
temp folder) and stops exactly the processes it started: the ones whose command line names its temp folder or one
of its ports, and their children. Never ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import fcntl
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

PORT_RANGE = range(20000, 30000)
"""Where test servers listen: below the ephemeral range, above Ray's default worker ports."""
BLOCK = 100
"""Ports per reserved block: 12 service ports and 88 worker ports for a Ray node."""
LOCK_DIR = Path(tempfile.gettempdir()) / "clipaudit-test-ports"
RAY = Path(sys.executable).with_name("ray")
REPO = Path(__file__).resolve().parents[1]
JOB_EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", "bench/results", "*.egg-info", "__pycache__"]
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
RAY_SERVICES = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                "runtime-env-agent-port")
"""The service ports a head needs (workers need all but the first three)."""


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class PortBlock:
    """A reserved block of :data:`BLOCK` consecutive ports, all free when reserved; release() frees the lock."""

    start: int
    lock: IO[str]

    @property
    def ports(self) -> range:
        return range(self.start, self.start + BLOCK)

    def release(self) -> None:
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def reserve_block() -> PortBlock:
    """Reserve a free block of ports in :data:`PORT_RANGE` (locked against other test processes)."""
    LOCK_DIR.mkdir(exist_ok=True)
    blocks = len(PORT_RANGE) // BLOCK
    first = (os.getpid() * 7919 + time.monotonic_ns()) % blocks
    for i in range(blocks):
        start = PORT_RANGE.start + ((first + i) % blocks) * BLOCK
        lock = open(LOCK_DIR / f"{start}.lock", "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if all(_is_free(port) for port in range(start, start + BLOCK)):
            return PortBlock(start, lock)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    raise RuntimeError(f"no free block of {BLOCK} ports in {PORT_RANGE}")


@contextmanager
def reserved_port() -> Iterator[int]:
    """One port of a reserved block (for a single server such as the S3 API server)."""
    block = reserve_block()
    try:
        yield block.start
    finally:
        block.release()


def processes_matching(markers: list[str], suffixes: tuple[str, ...] = ()) -> list[psutil.Process]:
    """Processes with a command-line argument that contains one of ``markers`` or ends with one of ``suffixes``,
    and all their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            args = process.info["cmdline"] or []
            if any(m in arg for arg in args for m in markers) or any(arg.endswith(suffixes) for arg in args):
                for p in [process, *process.children(recursive=True)]:
                    found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_processes(processes: list[psutil.Process]) -> None:
    """Terminate ``processes`` by pid, then kill what is left."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``ray`` commands and jobs: no auth, no usage stats, this venv first on the PATH."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


@dataclass
class RayCluster:
    """Ray nodes on 127.0.0.1 started with ``ray start``: ``start()`` a head, ``add_node()`` workers, ``stop()``."""

    env: dict[str, str] = field(default_factory=ray_env)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="cray", dir="/tmp"))
    blocks: list[PortBlock] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    node_dirs: list[Path] = field(default_factory=list)
    """The temp folder of each node added by :meth:`add_node`, in order (node 1 is the first)."""

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``ray start --address``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, block: PortBlock, services: tuple[str, ...], cpus: float, resources: dict | None) -> list[str]:
        ports = iter(block.ports)
        args = [f"--{name}={next(ports)}" for name in services]
        worker_low = block.start + 12
        args += [f"--min-worker-port={worker_low}", f"--max-worker-port={block.start + BLOCK - 1}",
                 f"--num-cpus={cpus:g}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return args

    def _ray_start(self, args: list[str]) -> None:
        started = subprocess.run([str(RAY), "start", *args], env=self.env, capture_output=True, text=True,
                                 timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")

    def start(self, cpus: float = 2, resources: dict | None = None) -> RayCluster:
        """Start the head (dashboard and job API included) and wait until the job API answers."""
        block = reserve_block()
        self.blocks.append(block)
        self.gcs_port, self.dashboard_port = block.start, block.start + 1
        self._ray_start(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--temp-dir={self.temp_dir}", *self._node_args(block, RAY_SERVICES, cpus, resources)])
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as response:
                    json.load(response)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def add_node(self, cpus: float = 2, resources: dict | None = None) -> None:
        """Start a worker node joined to the head, with its own block of ports and its own temp folder (inside
        the head's, so one folder names the whole cluster). Nodes on one host must not share a temp folder: each
        node's runtime-env agent deletes the job's working_dir from it when that node no longer needs it, under
        the feet of a driver running in it on another node."""
        block = reserve_block()
        self.blocks.append(block)
        node_dir = Path(self.temp_dir) / f"node{len(self.blocks)}"
        node_dir.mkdir()
        self.node_dirs.append(node_dir)
        self._ray_start([f"--address={self.address}", f"--temp-dir={node_dir}",
                         *self._node_args(block, RAY_SERVICES[3:], cpus, resources)])

    def wait_for_nodes(self, n: int, timeout_s: float = 60) -> None:
        """Block until ``n`` nodes are alive (asked through the job API's node list)."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.alive_nodes()
            if alive >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{alive} of {n} Ray nodes alive after {timeout_s} s")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        """How many nodes the GCS reports alive."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                             text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    def node_states(self) -> list[str]:
        """The state the GCS gives each node it knows (``ALIVE``, ``DEAD``), asked through the dashboard's state
        API (cheaper than a driver)."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes", timeout=10) as response:
            return [node["state"] for node in json.load(response)["data"]["result"]["result"]]

    def processes(self) -> list[psutil.Process]:
        """Every process this cluster started (found by its temp folder and its ports)."""
        suffixes = (f"127.0.0.1:{self.gcs_port}", *(f"={port}" for block in self.blocks for port in block.ports[:12]))
        return processes_matching([self.temp_dir], suffixes)

    def node_processes(self, index: int) -> list[psutil.Process]:
        """Every process of node ``index`` (1: the first node :meth:`add_node` started): the ones whose command line
        names its temp folder (its raylet, log monitor), and their children (workers, agents, the object store
        inside the raylet)."""
        node_dir = str(self.node_dirs[index - 1])
        return processes_matching([node_dir + os.sep], (f"={node_dir}",))

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of node ``index`` at once, as a reclaimed spot instance goes (no clean shutdown);
        again for any worker forked meanwhile, until none is left. Returns the pids killed."""
        killed: list[int] = []
        for _ in range(10):
            processes = self.node_processes(index)
            if not processes:
                return killed
            for process in processes:
                try:
                    process.kill()
                    killed.append(process.pid)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(processes, timeout=5)
        raise RuntimeError(f"node {index} keeps processes after 10 rounds of SIGKILL: {self.node_processes(index)}")

    def stop(self) -> None:
        """Stop exactly this cluster's processes, remove its temp folder, free its ports."""
        stop_processes(self.processes())
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for block in self.blocks:
            block.release()
        self.blocks.clear()


def submit_audit(cluster: RayCluster, config_path: Path, env_vars: dict[str, str] | None = None,
                 timeout_s: float = 420) -> tuple[dict, str]:
    """``ray job submit --working-dir REPO -- python jobs/audit.py --config CONFIG`` to ``cluster``; wait until the
    job ends (or ``timeout_s``); return its status (the job API's JSON) and its logs."""
    submission_id = f"clipaudit-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": JOB_EXCLUDES, "env_vars": {**JOB_ENV, **(env_vars or {})}}
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
         "--no-wait", "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "jobs/audit.py", "--config", str(config_path)],
        env=cluster.env, capture_output=True, text=True, timeout=120)
    if submit.returncode != 0:
        raise RuntimeError(f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}")
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/{submission_id}", timeout=10) as response:
            status = json.load(response)
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    logs = subprocess.run([str(RAY), "job", "logs", "--address", cluster.dashboard_url, submission_id],
                          env=cluster.env, capture_output=True, text=True, timeout=60).stdout
    return status, logs


@contextmanager
def ray_cluster(*node_cpus: float, resources: dict | None = None) -> Iterator[RayCluster]:
    """A head with ``node_cpus[0]`` CPUs plus one worker node per further entry; stopped on exit."""
    cluster = RayCluster()
    try:
        cluster.start(node_cpus[0], resources)
        for cpus in node_cpus[1:]:
            cluster.add_node(cpus, resources)
        cluster.wait_for_nodes(len(node_cpus))
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "every process of the cluster is gone"


MOTO_SERVER = Path(sys.executable).with_name("moto_server")


@dataclass
class S3Server:
    """An S3 API server (moto) on 127.0.0.1 with one bucket; ``env`` makes boto3, pyarrow and lance use it."""

    port: int
    bucket: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Variables for pyarrow/boto3 (AWS_ENDPOINT_URL) and lance's object store (AWS_ENDPOINT, AWS_ALLOW_HTTP)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT": self.endpoint,
                "AWS_ALLOW_HTTP": "true"}

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def upload_folder(self, folder: Path, prefix: str) -> None:
        """Upload every file under ``folder`` to ``s3://bucket/prefix/...``."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", [])]


@contextmanager
def s3_server(bucket: str = "clipaudit") -> Iterator[S3Server]:
    """A moto S3 server of our own on a reserved port, with ``bucket`` created; stopped by its pid on exit."""
    with reserved_port() as port:
        process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = S3Server(port, bucket)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    server.client().create_bucket(Bucket=bucket)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.3)
            yield server
        finally:
            stop_processes([psutil.Process(process.pid)] if process.poll() is None else [])
            process.wait(timeout=10)
