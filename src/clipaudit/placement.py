"""Where the model actors and the CPU tasks of a Ray stage go, planned from what each node has.

A Ray Data stage here is CPU tasks (read, decode, resize) feeding actor pools (model forwards). Ray places each
actor and each task on *one* node, so what matters is what each node has, never the cluster's total: two nodes of
1 CPU with a 0.5-CPU model actor each have 1 CPU free in all but no node can take a 1-CPU task, and the stage
waits forever. :func:`plan_placement` works from the node shapes (the nodes alive now, plus the node types an
autoscaler may still launch) and either returns a :class:`Placement` that fits, or raises
:class:`PlacementError` saying what is missing, before any work is submitted:

* every actor must fit on one node (its CPU share, and its GPU share on a GPU cluster);
* all the actors of the pools that run at once must fit together;
* after the actors are spread over the nodes (the worst case for fragmentation: Ray may spread them), some node
  must still have CPU for a task. A task asks for 1 CPU, or for what that node has left when that is less, so
  small nodes still decode.

Pure functions over :class:`NodeShape`; :mod:`clipaudit.runtime` reads the shapes from Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from clipaudit.errors import ClipauditError
from clipaudit.stages.embed_batches import torch_threads_for

TASK_CPUS = 1.0
"""CPU asked by a decode or transform task when a node has it."""
MIN_TASK_CPUS = 0.1
"""Below this much free CPU on every node, the tasks could not make progress: the plan fails."""
MAX_INSTANCES = 64
"""Instances of one autoscaled node type considered when spreading actors (enough for any pool here)."""


class PlacementError(ClipauditError, RuntimeError):
    """The stage's actors and tasks cannot be placed on the cluster's nodes (the message says what is missing)."""


@dataclass(frozen=True)
class NodeShape:
    """What one node (or one autoscaled node type, ``count`` of them at most) offers to tasks and actors."""

    name: str
    cpus: float
    gpus: float = 0.0
    count: int = 1

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        times = f" x{self.count}" if self.count > 1 else ""
        return f"{self.name} ({self.cpus:g} CPU{gpus}){times}"


@dataclass(frozen=True)
class Placement:
    """Where model forwards run, what each actor reserves, and what each CPU task asks for."""

    device: str
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    task_cpus: float = TASK_CPUS


def _fits(node_cpus: float, node_gpus: float, cpus: float, gpus: float) -> int:
    """How many actors of (cpus, gpus) fit on a node of (node_cpus, node_gpus)."""
    by_cpu = math.floor(node_cpus / cpus + 1e-9) if cpus > 0 else math.inf
    by_gpu = math.floor(node_gpus / gpus + 1e-9) if gpus > 0 else math.inf
    return int(min(by_cpu, by_gpu, 1_000_000))


def _nodes_text(nodes: Sequence[NodeShape]) -> str:
    return "; ".join(node.describe() for node in nodes) or "no nodes"


def choose_device(nodes: Sequence[NodeShape], setting: str) -> str:
    """``cuda`` when a node has a GPU and ``setting`` allows it, ``cpu`` otherwise; an error when ``setting`` is
    ``cuda`` and no node (alive or launchable) has a GPU."""
    has_gpu = any(node.gpus > 0 for node in nodes)
    if setting == "cuda" and not has_gpu:
        raise PlacementError(f"ray.device is cuda but no node of the cluster has a GPU (nodes: {_nodes_text(nodes)})")
    return "cuda" if has_gpu and setting != "cpu" else "cpu"


def spread_leftover(nodes: Sequence[NodeShape], actors: int, cpus: float, gpus: float) -> list[float]:
    """Free CPU per node instance after placing ``actors`` one by one on the instance with the most free CPU
    that can take one (Ray's spread: the worst case for the tasks). Raises PlacementError if they do not fit."""
    free = [[node.cpus, node.gpus] for node in nodes for _ in range(min(node.count, MAX_INSTANCES))]
    for placed in range(actors):
        candidates = [slot for slot in free if _fits(slot[0], slot[1], cpus, gpus) >= 1]
        if not candidates:
            raise PlacementError(
                f"{actors} model actors of {cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''} each do not fit: only "
                f"{placed} can be placed (nodes: {_nodes_text(nodes)}). Lower embed.actors_per_model or "
                "embed.cpus_per_actor, or add nodes")
        slot = max(candidates, key=lambda s: s[0])
        slot[0] -= cpus
        slot[1] -= gpus
    return [slot[0] for slot in free]


def plan_placement(nodes: Sequence[NodeShape], *, device_setting: str, pools: int, actors_per_pool: int,
                   cpus_per_actor: float, gpus_per_actor: float, torch_threads: int = 0) -> Placement:
    """The placement of ``pools`` actor pools of ``actors_per_pool`` actors each, running at once, plus their
    CPU tasks, on ``nodes``; PlacementError naming what is missing when they cannot all be placed.

    ``torch_threads`` is the intra-op thread count asked for an actor (0: its CPU share rounded up).
    """
    device = choose_device(nodes, device_setting)
    if device == "cuda":
        cpus, gpus = min(cpus_per_actor, 1.0), gpus_per_actor
    else:
        cpus, gpus = cpus_per_actor, 0.0
    if not any(_fits(node.cpus, node.gpus, cpus, gpus) for node in nodes):
        need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        raise PlacementError(f"a model actor needs {need} on one node, and no node has that (nodes: "
                             f"{_nodes_text(nodes)}). Lower embed.cpus_per_actor"
                             f"{' / embed.gpus_per_actor' if gpus else ''} or add a bigger node")
    leftover = spread_leftover(nodes, pools * actors_per_pool, cpus, gpus)
    task_cpus = min(TASK_CPUS, max(leftover, default=0.0))
    if task_cpus < MIN_TASK_CPUS:
        raise PlacementError(
            f"after its {pools * actors_per_pool} model actor(s) of {cpus:g} CPU each, no node has CPU left for "
            f"the decode tasks (nodes: {_nodes_text(nodes)}). Lower embed.cpus_per_actor or "
            "embed.actors_per_model, or add a node")
    task_cpus = math.floor(task_cpus * 100) / 100
    if device == "cuda":
        return Placement("cuda", cpus, gpus, torch_threads or 1, task_cpus)
    return Placement("cpu", cpus, 0.0, torch_threads_for(cpus, torch_threads), task_cpus)
