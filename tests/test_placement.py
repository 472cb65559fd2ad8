"""Placement planned from what each node has (no Ray): actors and tasks fit a node, or a clear error names what is
missing; the two-node shapes of the cluster issue among the cases."""

from __future__ import annotations

import pytest

from clipaudit.placement import NodeShape, PlacementError, PoolRequest, plan_placement, spread_leftover


def plan(nodes: list[NodeShape], *, pools: int = 2, actors: int = 1, cpus: float | None = 0.5, gpus: float = 1.0,
         device: str = "auto"):
    return plan_placement(nodes, PoolRequest(what="model actor", keys="embed.cpus_per_actor", device_setting=device,
                                             actors=pools * actors, cpus_per_actor=cpus, gpus_per_actor=gpus))


def topk(nodes: list[NodeShape], *, cpus: float = 1.0, workers: int | None = None, device: str = "auto"):
    return plan_placement(nodes, PoolRequest(what="top-k actor", keys="neighbours.ray_cpus_per_worker",
                                             device_setting=device, actors=None, cpus_per_actor=cpus, gpu_cpus=cpus,
                                             max_actors=workers, with_tasks=False))


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
    with pytest.raises(PlacementError, match=r"device is cuda but no node.*head \(2 CPU\)"):
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


def test_default_share_shrinks_until_four_actors_and_a_decode_task_fit_two_cpus():
    """The leaderboard config on one 2-CPU machine: three CLIP models and a reference, defaults only."""
    placement = plan([NodeShape("laptop", 2)], pools=4, cpus=None)
    assert (placement.cpus_per_actor, placement.task_cpus, placement.actors, placement.shrunk) == (0.25, 1.0, 4, True)
    assert placement.threads == 1


def test_default_share_stays_when_it_fits():
    placement = plan([NodeShape("laptop", 2)], pools=2, cpus=None)
    assert (placement.cpus_per_actor, placement.shrunk) == (0.5, False)


def test_a_share_the_user_set_is_never_shrunk():
    with pytest.raises(PlacementError, match="no node has CPU left for the decode tasks"):
        plan([NodeShape("laptop", 2)], pools=4, cpus=0.5)


def test_default_share_refused_below_the_smallest_share_says_what_was_tried():
    with pytest.raises(PlacementError, match=r"tried from 0.5 down to 0.0625"):
        plan([NodeShape("tiny", 0.2)], pools=4, cpus=None)


def test_topk_pool_takes_one_actor_per_cpu_share_capped_by_the_smallest_node():
    placement = topk([NodeShape("a", 4), NodeShape("b", 2)], cpus=3.0)
    assert (placement.device, placement.cpus_per_actor, placement.actors, placement.task_cpus) == ("cpu", 2.0, 3, 0)
    assert topk([NodeShape("a", 4)], workers=2).actors == 2


def test_topk_pool_takes_one_actor_per_gpu():
    placement = topk([NodeShape("g", 8, gpus=2), NodeShape("cpu-only", 16)], cpus=1.0)
    assert (placement.device, placement.actors, placement.gpus_per_actor, placement.cpus_per_actor) == (
        "cuda", 2, 1.0, 1.0)


def test_topk_pool_without_cpu_anywhere_is_refused():
    with pytest.raises(PlacementError, match="top-k actor needs"):
        topk([])


def test_bundles_are_what_an_autoscaler_is_asked_for():
    placement = plan([NodeShape("gpu_worker", 8, gpus=1, count=4)], pools=2, cpus=0.5)
    assert placement.bundles() == [{"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}, {"CPU": 1.0}]
