"""Placement planned from what each node has (no Ray): actors and tasks fit a node, or a clear error names what is
missing; the two-node shapes of the cluster issue among the cases."""

from __future__ import annotations

import pytest

from clipaudit.placement import NodeShape, PlacementError, plan_placement, spread_leftover


def plan(nodes: list[NodeShape], *, pools: int = 2, actors: int = 1, cpus: float = 0.5, gpus: float = 1.0,
         device: str = "auto"):
    return plan_placement(nodes, device_setting=device, pools=pools, actors_per_pool=actors, cpus_per_actor=cpus,
                          gpus_per_actor=gpus)


def test_one_two_cpu_node_keeps_whole_cpu_tasks():
    placement = plan([NodeShape("head", 2)])
    assert (placement.device, placement.cpus_per_actor, placement.task_cpus) == ("cpu", 0.5, 1.0)


def test_two_one_cpu_nodes_get_half_cpu_tasks_instead_of_waiting_forever():
    """The hang of the issue: a 0.5-CPU actor on each 1-CPU node leaves no node with a whole CPU for a task."""
    nodes = [NodeShape("a", 1), NodeShape("b", 1)]
    assert spread_leftover(nodes, 2, 0.5, 0.0) == [0.5, 0.5]
    placement = plan(nodes)
    assert placement.task_cpus == 0.5


def test_actor_bigger_than_every_node_is_refused_and_named():
    with pytest.raises(PlacementError, match=r"needs 1.5 CPU on one node.*a \(1 CPU\); b \(1 CPU\)"):
        plan([NodeShape("a", 1), NodeShape("b", 1)], cpus=1.5)


def test_too_many_actors_for_the_cluster_is_refused():
    with pytest.raises(PlacementError, match=r"4 model actors of 0.75 CPU each do not fit: only 2"):
        plan([NodeShape("a", 1), NodeShape("b", 1)], actors=2, cpus=0.75)


def test_no_cpu_left_for_tasks_is_refused():
    with pytest.raises(PlacementError, match="no node has CPU left for the decode tasks"):
        plan([NodeShape("a", 1), NodeShape("b", 1)], cpus=1.0)


def test_gpu_nodes_take_gpu_actors_and_keep_cpu_for_tasks():
    """An autoscaling cluster: a head with no CPU for work, GPU workers that the autoscaler may launch."""
    nodes = [NodeShape("gpu_worker (autoscaled)", 8, gpus=1, count=8)]
    placement = plan(nodes, pools=2, cpus=0.5)
    assert (placement.device, placement.gpus_per_actor, placement.task_cpus) == ("cuda", 1.0, 1.0)


def test_fractional_gpu_actors_share_a_gpu():
    placement = plan([NodeShape("g", 4, gpus=1)], pools=2, gpus=0.5)
    assert placement.device == "cuda" and placement.task_cpus == 1.0


def test_gpu_actors_beyond_the_gpus_are_refused():
    with pytest.raises(PlacementError, match=r"0.5 CPU \+ 1 GPU each do not fit: only 1"):
        plan([NodeShape("g", 8, gpus=1)], pools=2, gpus=1.0)


def test_cuda_asked_without_a_gpu_names_the_nodes():
    with pytest.raises(PlacementError, match=r"ray.device is cuda but no node.*head \(2 CPU\)"):
        plan([NodeShape("head", 2)], device="cuda")


def test_cpu_device_ignores_gpus():
    placement = plan([NodeShape("g", 4, gpus=1)], device="cpu")
    assert (placement.device, placement.gpus_per_actor) == ("cpu", 0.0)


def test_nodes_sharing_a_session_folder_are_found():
    """Two ``ray start`` on one host with one --temp-dir: the cause of the two-node job's segfault."""
    from clipaudit.runtime import shared_session_dirs

    def node(node_id: str, session: str, socket: str = "plasma_store") -> dict:
        return {"NodeID": node_id, "ObjectStoreSocketName": f"/tmp/{session}/sockets/{socket}"}

    shared = [node("aaaaaaaa11", "ray/session_1"), node("bbbbbbbb22", "ray/session_1", "plasma_store.1")]
    assert shared_session_dirs(shared) == {"/tmp/ray/session_1": ["aaaaaaaa", "bbbbbbbb"]}
    private = [node("aaaaaaaa11", "ray/session_1"), node("bbbbbbbb22", "ray/node2/session_1")]
    assert shared_session_dirs(private) == {}
