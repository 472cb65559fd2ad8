"""A Ray cluster with its own autoscaler on this machine: Ray's fake multi-node provider starts worker "nodes"
(raylets on this machine) when there is demand and stops them when they have been idle, as a cloud autoscaler would.

:func:`fake_autoscaling_cluster` starts a head with 0 CPUs and ``ray start --autoscaling-config`` (the v1 monitor,
or autoscaler v2 with ``v2=True``) on a block of ports of its own (cluster_helpers.py), and on exit stops exactly the
processes of that cluster: the head's, the ray client server, and the worker raylets the autoscaler launched (they
share the head's temp folder, and name it in their command lines). Never ``ray stop``, never
``AutoscalingCluster.start()`` from ``ray.cluster_utils`` (it runs ``ray stop --force``).

The config has every top-level key written out: with provider type ``external`` the autoscaler fills in no defaults
(and the 2.60 wheel lacks the ``fake_multi_node/example.yaml`` that provider type ``fake_multinode`` would load).

Worker nodes are counted without ``ray.init`` in the calling process: the dashboard's state API
(``/api/v0/nodes``), plain HTTP. The autoscaler runs a round every ``update_interval_s`` (1 s here, as in
``ray.cluster_utils``; Ray's default is 5 s): a worker comes up 2-4 s after the demand, and goes about 15 s after
the end of its last task with ``idle_timeout_minutes=0.25``.

Ray itself never reports the node types to the GCS under ``ray start --autoscaling-config``
(``ray._private.state.state.get_cluster_config()`` stays None, v1 and v2); nothing in the 2.60 Python code calls the
GCS's ReportClusterConfig. ``report_cluster_config=True`` reports them, for code that reads it (Ray Data does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cluster_helpers import RayCluster, ray_env

FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
"""The node id ``ray start --head`` takes under ``RAY_FAKE_CLUSTER=1`` (the provider's head instance id)."""
HEAD_TYPE = "ray.head.default"
WORKER_TYPE = "cpu_worker"


def autoscaling_config(gcs_address: str, worker_cpus: float, max_workers: int, idle_timeout_minutes: float,
                       min_workers: int = 0, worker_resources: dict | None = None) -> dict:
    """A cluster config for the fake multi-node provider: a head type with no resources and one worker type."""
    return {
        "cluster_name": "fake-autoscaling",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {},
        "docker": {},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "max_workers": 0, "node_config": {}},
            WORKER_TYPE: {"resources": {"CPU": worker_cpus, **(worker_resources or {})},
                          "min_workers": min_workers, "max_workers": max_workers, "node_config": {}},
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeAutoscalingCluster(RayCluster):
    """A :class:`RayCluster` whose head (0 CPUs) runs an autoscaler over the fake multi-node provider.

    ``address`` (GCS), ``dashboard_url`` (``ray job submit --address``), ``env`` (for ``ray`` commands and jobs),
    ``config_path`` / ``config`` (the autoscaling config), ``nodes()``, ``worker_nodes()``,
    ``wait_for_workers(n, timeout_s)``, ``job_status(submission_id)``, ``report_cluster_config()``, ``stop()``.
    """

    config_dir: Path = field(default_factory=Path)
    worker_cpus: float = 2
    max_workers: int = 2
    idle_timeout_minutes: float = 0.25
    min_workers: int = 0
    worker_resources: dict | None = None
    v2: bool = False
    update_interval_s: int | None = 1
    """The autoscaler's round (``AUTOSCALER_UPDATE_INTERVAL_S``; Ray's default, None, is 5 s)."""

    def __post_init__(self) -> None:
        self.env = {**self.env, "RAY_FAKE_CLUSTER": "1"}
        # With it the monitor would tear the workers down itself on SIGTERM; we stop every process by pid instead.
        self.env.pop("RAY_AUTOSCALER_FATESHARE_WORKERS", None)
        if self.update_interval_s is not None:
            self.env["AUTOSCALER_UPDATE_INTERVAL_S"] = str(self.update_interval_s)
        if self.v2:
            # Without the head's cloud instance id, v2 never sees the head instance running and launches nothing
            # ("Adding 1 node(s) of type ..." every round); ray.cluster_utils.AutoscalingCluster sets it too.
            self.env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID})

    @property
    def config_path(self) -> Path:
        return self.config_dir / "autoscaling.yaml"

    @property
    def config(self) -> dict:
        """The autoscaling config the head was started with."""
        return yaml.safe_load(self.config_path.read_text())

    def _ray_start(self, args: list[str]) -> None:
        # RayCluster.start() has picked the GCS port by now: the config names it (the provider's gcs_address).
        config = autoscaling_config(self.address, self.worker_cpus, self.max_workers, self.idle_timeout_minutes,
                                    self.min_workers, self.worker_resources)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # The monitor's and the dashboard's metrics servers default to fixed ports (44217, 44227): take two of the
        # block's spare service ports instead (RayCluster uses 9 of its 12).
        self.env.update({"AUTOSCALER_METRIC_PORT": str(self.gcs_port + 9),
                         "DASHBOARD_METRIC_PORT": str(self.gcs_port + 10)})
        super()._ray_start([*args, f"--autoscaling-config={self.config_path}"])

    def add_node(self, cpus: float = 2, resources: dict | None = None) -> None:
        raise NotImplementedError("the autoscaler adds the worker nodes")

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (alive or dead), from the dashboard's state API: dicts with ``node_id``,
        ``state`` (ALIVE, DEAD), ``is_head_node``, ``resources_total``, ``labels``..."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=1000&timeout=20&detail=true"
        with urllib.request.urlopen(url, timeout=30) as response:
            reply = json.load(response)
        return reply["data"]["result"]["result"]

    def worker_nodes(self) -> int:
        """How many worker nodes (alive, with CPUs) the cluster has now."""
        return sum(1 for node in self.nodes()
                   if node["state"] == "ALIVE" and not node["is_head_node"]
                   and node.get("resources_total", {}).get("CPU", 0) > 0)

    def wait_for_workers(self, n: int, timeout_s: float = 60) -> float:
        """Block until exactly ``n`` worker nodes are alive; return the seconds it took."""
        start = time.monotonic()
        while True:
            count = self.worker_nodes()
            if count == n:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{count} worker nodes, not {n}, after {timeout_s} s")
            time.sleep(0.5)

    def job_status(self, submission_id: str) -> dict:
        """A submitted job's status (the job API's JSON: ``status``, ``message``, ...)."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/{submission_id}", timeout=30) as response:
            return json.load(response)

    def report_cluster_config(self) -> None:
        """Tell the GCS the node types (``ray start --autoscaling-config`` never does, v1 or v2):
        ``ray._private.state.state.get_cluster_config()``, which Ray Data reads for the cluster's largest size,
        answers from then on instead of None. Resources go in as whole numbers (the proto's are uint64). Done in a
        subprocess, as RayCluster.alive_nodes is."""
        types = {name: {"resources": spec.get("resources", {}), "min_workers": spec.get("min_workers", 0),
                        "max_workers": spec.get("max_workers", 0)}
                 for name, spec in self.config["available_node_types"].items()}
        subprocess.run([sys.executable, "-c", _REPORT_CLUSTER_CONFIG, self.address, json.dumps(types)],
                       env=self.env, check=True, capture_output=True, text=True, timeout=60)


_REPORT_CLUSTER_CONFIG = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import ClusterConfig
config = ClusterConfig()
for name, spec in json.loads(sys.argv[2]).items():
    group = config.node_group_configs.add(name=name, min_count=spec["min_workers"], max_count=spec["max_workers"])
    for resource, amount in spec["resources"].items():
        group.resources[resource] = int(amount)
GcsClient(address=sys.argv[1]).report_cluster_config(config.SerializeToString())
"""


@contextmanager
def fake_autoscaling_cluster(tmp_path: Path, worker_cpus: float = 2, max_workers: int = 2,
                             idle_timeout_minutes: float = 0.25, v2: bool = False, *, min_workers: int = 0,
                             worker_resources: dict | None = None, update_interval_s: int | None = 1,
                             report_cluster_config: bool = False) -> Iterator[FakeAutoscalingCluster]:
    """A 0-CPU head with an autoscaler (the v1 monitor, or autoscaler v2 with ``v2=True``) that may launch up to
    ``max_workers`` worker nodes of type ``cpu_worker`` (``worker_cpus`` CPUs and ``worker_resources`` each), and
    stops one after ``idle_timeout_minutes`` of idleness. The config goes to ``tmp_path/autoscaling.yaml``. With
    ``report_cluster_config`` the GCS is told the node types too (see FakeAutoscalingCluster.report_cluster_config).
    Every process of the cluster (the launched workers too) is stopped on exit, and none is left."""
    cluster = FakeAutoscalingCluster(env=ray_env(), config_dir=Path(tmp_path), worker_cpus=worker_cpus,
                                     max_workers=max_workers, idle_timeout_minutes=idle_timeout_minutes,
                                     min_workers=min_workers, worker_resources=worker_resources, v2=v2,
                                     update_interval_s=update_interval_s)
    try:
        cluster.start(cpus=0)
        if report_cluster_config:
            cluster.report_cluster_config()
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "every process of the cluster is gone"
