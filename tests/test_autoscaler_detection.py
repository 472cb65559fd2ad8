"""What tells a driver that its cluster can grow, and into which node types (no Ray here: the status documents and
config files the Ray 2.60 autoscaler writes, as seen on the fake multi-node cluster; the live check is in
test_autoscaling.py)."""

from __future__ import annotations

import yaml

from clipaudit.runtime.autoscaler import node_types_of, v1_can_grow

REPO_CLUSTER = __import__("pathlib").Path(__file__).resolve().parents[1] / "cluster.yaml"
HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def test_a_v1_monitor_without_a_config_names_types_read_only():
    status = {"autoscaler_report": {"node_type_mapping": {"d2605": "node_d2605", "a1b2": "node_a1b2"}}}
    assert not v1_can_grow(status)
    assert not v1_can_grow({}) and not v1_can_grow({"autoscaler_report": None})


def test_a_v1_monitor_with_a_config_maps_nodes_to_its_types():
    assert v1_can_grow({"autoscaler_report": {"node_type_mapping": {HEAD: "ray.head.default"}}})


def test_node_types_of_the_shipped_cluster_file():
    (gpu_worker,) = node_types_of(yaml.safe_load(REPO_CLUSTER.read_text()))
    assert (gpu_worker.cpus, gpu_worker.gpus, gpu_worker.count) == (8, 1, 8)
    assert "gpu_worker" in gpu_worker.name


def test_node_types_skip_the_head_and_cap_counts_at_max_workers():
    config = {"max_workers": 3, "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "small": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 10},
        "custom_only": {"resources": {"accelerator_x": 1}, "max_workers": 2},
    }}
    (small,) = node_types_of(config)
    assert (small.cpus, small.gpus, small.count) == (2, 0, 3)
