"""Whether the cluster a driver joined can grow, and into which node types: what Ray 2.60 tells a driver.

Read from the installed Ray's source and checked on a fake multi-node autoscaling cluster here (v1 and v2):

* ``ray._private.state.state.get_cluster_config()`` answers only where something reported the node types to the
  GCS (``GcsClient.report_cluster_config``: hosted and KubeRay-style setups); ``ray start --autoscaling-config``
  never does, v1 or v2, so it is None there. When it answers, its node groups are the types the autoscaler may
  launch (resources, max count): the one source of node types a driver has.
* The monitor process (v1 and v2) runs on the head with ``--autoscaling-config=PATH`` when the cluster has a config
  of node types (``ray up`` writes ``~/ray_bootstrap_config.yaml``); a driver on the head (``ray job submit``)
  finds it among the processes of its session and reads the node types from the file.
* Autoscaler v1: the monitor writes ``__autoscaling_status`` (JSON) to the GCS internal KV every round, also on a
  cluster started without ``--autoscaling-config`` (a ``ray.init()`` too), where it runs over a read-only provider
  that names each node's type ``node_<node id>`` (``format_readonly_node_type``). A monitor with a real config maps
  nodes to the config's type names (the head's included): a cluster that can grow.
* Autoscaler v2 (``__autoscaler_v2_enabled`` = ``1`` in the KV namespace ``__autoscaler``): the GCS's cluster
  status names ``autoscaler_version`` 2 once an autoscaler reports, and ``0`` without one. A v2 autoscaler over a
  read-only provider reports too, and names types the same read-only way as a fake head does, so a v2 cluster
  that reports is taken as one that can grow: a plan it cannot serve waits ``ray.autoscale_timeout_s``, then fails
  saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from clipaudit.placement import MAX_INSTANCES, NodeShape

MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
"""The autoscaler's monitor process, v1 and v2 (what its command line ends with)."""
READONLY_TYPE_PREFIX = "node_"
"""How a read-only provider names a node's type: ``node_<node id hex>``."""


@dataclass(frozen=True)
class Autoscaler:
    """The autoscaler of a cluster: where its presence was read (``v1``, ``v2``, ``reported``) and the node types
    it may launch (empty when the cluster does not report them)."""

    version: str
    node_types: tuple[NodeShape, ...] = ()


def reported_node_types() -> tuple[NodeShape, ...] | None:
    """The node types reported to the GCS (None when none were): each with CPU or GPU and a max count > 0."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no such state on this cluster
        return None
    if config is None:
        return None
    shapes = (_launchable(group.name, dict(group.resources), group.max_count if group.max_count >= 0
                          else MAX_INSTANCES) for group in config.node_group_configs)
    return tuple(shape for shape in shapes if shape is not None)


def _launchable(name: str, resources: dict, count: int) -> NodeShape | None:
    """A node type as a shape, or None when it may not be launched or offers neither CPU nor GPU."""
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if count <= 0 or not (cpus or gpus):
        return None
    return NodeShape(f"node type {name} (autoscaled)", cpus, gpus, count=count)


def v1_can_grow(status: dict) -> bool:
    """Whether a v1 monitor's ``__autoscaling_status`` comes from an autoscaler with a config of node types (not a
    read-only one): some node is mapped to a type other than its read-only name."""
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"{READONLY_TYPE_PREFIX}{node_id}" for node_id, node_type in mapping.items())


def monitor_node_types() -> tuple[NodeShape, ...] | None:
    """The node types of the autoscaler's own config file, when its monitor runs on this machine (a driver on the
    head, as under ``ray job submit``): the monitor of this session names it ``--autoscaling-config=PATH``. None
    when no such monitor is seen here (a fixed cluster, or a driver on another machine)."""
    import psutil
    import ray
    import yaml

    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return None
    for process in psutil.process_iter(["cmdline"]):
        args = process.info.get("cmdline") or []
        if not any(arg.endswith(MONITOR_SCRIPTS) for arg in args):
            continue
        if not any(arg.startswith(f"--logs-dir={session_dir}") for arg in args):
            continue
        paths = [arg.split("=", 1)[1] for arg in args if arg.startswith("--autoscaling-config=")]
        if not paths:
            return None
        try:
            with open(os.path.expanduser(paths[0])) as handle:
                config = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError):
            return ()
        return node_types_of(config)
    return None


def node_types_of(config: dict) -> tuple[NodeShape, ...]:
    """The launchable node types of a cluster config (``available_node_types``): those with CPU or GPU and a max
    count above 0, the count capped by the cluster's ``max_workers``."""
    cap = int(config.get("max_workers", MAX_INSTANCES))
    shapes = (_launchable(name, spec.get("resources") or {}, min(int(spec.get("max_workers", cap)), cap))
              for name, spec in (config.get("available_node_types") or {}).items())
    return tuple(shape for shape in shapes if shape is not None)


def read_autoscaler() -> Autoscaler | None:
    """The cluster's autoscaler (how it was found, and its node types where they can be read), or None when the
    cluster cannot grow."""
    import ray
    from ray.experimental import internal_kv

    types = reported_node_types()
    if types is not None:
        return Autoscaler("reported", types)
    v2 = internal_kv._internal_kv_get(b"__autoscaler_v2_enabled", namespace=b"__autoscaler") == b"1"
    version = "v2" if v2 else "v1"
    from_file = monitor_node_types()
    if from_file is not None:
        return Autoscaler(version, from_file)
    if v2:
        from ray.autoscaler.v2.sdk import get_cluster_status

        try:
            status = get_cluster_status(ray.get_runtime_context().gcs_address)
        except Exception:  # noqa: BLE001 - no autoscaler state reported: none runs
            return None
        return Autoscaler(version) if str(status.stats.autoscaler_version) == "2" else None
    raw = internal_kv._internal_kv_get(b"__autoscaling_status")
    if not raw:
        return None
    try:
        status = json.loads(raw)
    except ValueError:
        return None
    return Autoscaler(version) if v1_can_grow(status) else None
