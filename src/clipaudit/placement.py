"""Where the actors and the CPU tasks of a Ray stage go, planned from what each node has: one planner for every
pool (the embed and TCAC model actors, the top-k actors).

A Ray Data stage here is CPU tasks (read, decode, resize) feeding actor pools (model forwards). Ray places each
actor and each task on *one* node, so what matters is what each node has, never the cluster's total: two nodes of
1 CPU with a 0.5-CPU model actor each have 1 CPU free in all but no node can take a 1-CPU task, and the stage
waits forever. :func:`plan_placement` works from the node shapes (the nodes alive now, or those plus the node
types an autoscaler may still launch) and a :class:`PoolRequest`, and either returns a :class:`Placement` that
fits, or raises :class:`PlacementError` saying what is missing, before any work is submitted:

* every actor must fit on one node (its CPU share, and its GPU share on a GPU cluster);
* all the actors of the pools that run at once must fit together;
* after the actors are spread over the nodes (the worst case for fragmentation: Ray may spread them), some node
  must still have CPU for a task, when tasks feed the pool. A task asks for 1 CPU, or for what that node has left
  when that is less, so small nodes still decode.

A CPU share left unset (``None``) is a default that fits the machine: :data:`DEFAULT_CPU_SHARE`, halved until
every actor and a decode task fit (three CLIP models and a reference on one 2-CPU machine: 0.25 each). A share the
user set is kept as it is, or refused with the reason.

Pure functions over :class:`NodeShape`; :mod:`clipaudit.runtime` reads the shapes from Ray and asks an autoscaler
for the nodes a plan needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from clipaudit.errors import ClipauditError

TASK_CPUS = 1.0
"""CPU asked by a decode or transform task when a node has it."""
MIN_TASK_CPUS = 0.1
"""Below this much free CPU on every node, the tasks could not make progress: the plan fails."""
DEFAULT_CPU_SHARE = 0.5
"""CPU reserved by a model actor whose share is left to the planner, before it is shrunk to fit."""
MIN_CPU_SHARE = 0.05
"""The smallest share the planner shrinks to; below it the plan fails and says so."""
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
class PoolRequest:
    """An actor pool (or several that run at once) to place.

    ``actors`` None: as many as the nodes hold, at most ``max_actors`` (the top-k pool: one per GPU, or one per
    CPU share); ``cpus_per_actor`` None: :data:`DEFAULT_CPU_SHARE` shrunk to fit (CPU device only). ``gpu_cpus``
    caps the CPU an actor reserves when it runs on a GPU. ``with_tasks``: CPU tasks feed the pool, so a node
    must keep CPU for one. ``what`` and ``keys`` name the actors and the config keys in error messages.
    """

    what: str
    keys: str
    device_setting: str = "auto"
    actors: int | None = 1
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 1.0
    gpu_cpus: float = 1.0
    max_actors: int | None = None
    with_tasks: bool = True
    torch_threads: int = 0


@dataclass(frozen=True)
class Placement:
    """Where the actors run, how many, what each reserves, and what each CPU task asks for."""

    device: str
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    task_cpus: float = TASK_CPUS
    actors: int = 1
    shrunk: bool = False
    """True when the planner lowered a default CPU share to fit the nodes."""

    def bundles(self) -> list[dict[str, float]]:
        """The resource bundles of this placement (one per actor, one per task): what to ask an autoscaler for."""
        actor = {"CPU": self.cpus_per_actor, **({"GPU": self.gpus_per_actor} if self.gpus_per_actor else {})}
        tasks = [{"CPU": self.task_cpus}] if self.task_cpus else []
        return [dict(actor) for _ in range(self.actors)] + tasks

    def describe(self) -> str:
        gpus = f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        tasks = f"; tasks of {self.task_cpus:g} CPU" if self.task_cpus else ""
        return f"{self.actors} actor(s) of {self.cpus_per_actor:g} CPU{gpus} on {self.device}{tasks}"


def _fits(node_cpus: float, node_gpus: float, cpus: float, gpus: float) -> int:
    """How many actors of (cpus, gpus) fit on a node of (node_cpus, node_gpus)."""
    by_cpu = math.floor(node_cpus / cpus + 1e-9) if cpus > 0 else math.inf
    by_gpu = math.floor(node_gpus / gpus + 1e-9) if gpus > 0 else math.inf
    return int(min(by_cpu, by_gpu, 1_000_000))


def nodes_text(nodes: Sequence[NodeShape]) -> str:
    """The shapes as one line for a message (``no nodes`` when empty)."""
    return "; ".join(node.describe() for node in nodes) or "no nodes"


def choose_device(nodes: Sequence[NodeShape], setting: str) -> str:
    """``cuda`` when a node has a GPU and ``setting`` allows it, ``cpu`` otherwise; an error when ``setting`` is
    ``cuda`` and no node (alive or launchable) has a GPU."""
    has_gpu = any(node.gpus > 0 for node in nodes)
    if setting == "cuda" and not has_gpu:
        raise PlacementError(f"device is cuda but no node of the cluster has a GPU (nodes: {nodes_text(nodes)})")
    return "cuda" if has_gpu and setting != "cpu" else "cpu"


def _instances(nodes: Sequence[NodeShape]) -> list[list[float]]:
    return [[node.cpus, node.gpus] for node in nodes for _ in range(min(node.count, MAX_INSTANCES))]


def capacity(nodes: Sequence[NodeShape], cpus: float, gpus: float) -> int:
    """How many actors of (cpus, gpus) the nodes hold in all."""
    return sum(_fits(c, g, cpus, gpus) for c, g in _instances(nodes))


def spread_leftover(nodes: Sequence[NodeShape], actors: int, cpus: float, gpus: float, what: str = "model actors",
                    keys: str = "embed.actors_per_model or embed.cpus_per_actor") -> list[float]:
    """Free CPU per node instance after placing ``actors`` one by one on the instance with the most free CPU
    that can take one (Ray's spread: the worst case for the tasks). Raises PlacementError if they do not fit."""
    free = _instances(nodes)
    for placed in range(actors):
        candidates = [slot for slot in free if _fits(slot[0], slot[1], cpus, gpus) >= 1]
        if not candidates:
            raise PlacementError(
                f"{actors} {what} of {cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''} each do not fit: only "
                f"{placed} can be placed (nodes: {nodes_text(nodes)}). Lower {keys}, or add nodes")
        slot = max(candidates, key=lambda s: s[0])
        slot[0] -= cpus
        slot[1] -= gpus
    return [slot[0] for slot in free]


def plan_placement(nodes: Sequence[NodeShape], request: PoolRequest) -> Placement:
    """The placement of ``request`` on ``nodes``; PlacementError naming what is missing when it cannot be placed.

    ``torch_threads`` of the request is the intra-op thread count asked for an actor (0: its CPU share rounded
    up on CPU, 1 on a GPU)."""
    device = choose_device(nodes, request.device_setting)
    if device == "cuda":
        gpus = request.gpus_per_actor
        gpu_nodes = [node for node in nodes if node.gpus >= gpus]
        cpus = min(request.cpus_per_actor or request.gpu_cpus, request.gpu_cpus,
                   *(node.cpus for node in gpu_nodes or nodes))
        return _plan_shares(nodes, request, device, [cpus], gpus, shrinkable=False)
    smallest = min((node.cpus for node in nodes if node.cpus > 0), default=math.inf)
    if request.cpus_per_actor is not None:
        cpus = min(request.cpus_per_actor, smallest) if request.actors is None else request.cpus_per_actor
        return _plan_shares(nodes, request, device, [cpus], 0.0, shrinkable=False)
    shares = []
    share = min(DEFAULT_CPU_SHARE, smallest) if request.actors is None else DEFAULT_CPU_SHARE
    while share >= MIN_CPU_SHARE - 1e-12:
        shares.append(round(share, 4))
        share /= 2
    return _plan_shares(nodes, request, device, shares, 0.0, shrinkable=True)


def _plan_shares(nodes: Sequence[NodeShape], request: PoolRequest, device: str, shares: list[float], gpus: float,
                 shrinkable: bool) -> Placement:
    """The first of ``shares`` (CPU per actor, largest first) under which the request fits; the error of the last
    one tried when none does."""
    error: PlacementError | None = None
    for cpus in shares:
        try:
            placement = _plan_one(nodes, request, device, cpus, gpus)
        except PlacementError as refused:
            error = refused
            continue
        return replace(placement, shrunk=shrinkable and cpus != shares[0])
    assert error is not None
    if shrinkable and len(shares) > 1:
        raise PlacementError(f"{error} (the default CPU share was tried from {shares[0]:g} down to {shares[-1]:g})")
    raise error


def _plan_one(nodes: Sequence[NodeShape], request: PoolRequest, device: str, cpus: float,
              gpus: float) -> Placement:
    if not any(_fits(node.cpus, node.gpus, cpus, gpus) for node in nodes):
        need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        raise PlacementError(f"a {request.what} needs {need} on one node, and no node has that (nodes: "
                             f"{nodes_text(nodes)}). Lower {request.keys} or add a bigger node")
    actors = request.actors
    if actors is None:
        held = capacity(nodes, cpus, gpus)
        actors = min(request.max_actors or held, held)
    leftover = spread_leftover(nodes, actors, cpus, gpus, f"{request.what}s", request.keys)
    task_cpus = 0.0
    if request.with_tasks:
        task_cpus = min(TASK_CPUS, max(leftover, default=0.0))
        if task_cpus < MIN_TASK_CPUS:
            raise PlacementError(
                f"after its {actors} {request.what}(s) of {cpus:g} CPU each, no node has CPU left for the decode "
                f"tasks (nodes: {nodes_text(nodes)}). Lower {request.keys}, or add a node")
        task_cpus = math.floor(task_cpus * 100) / 100
    threads = (request.torch_threads or 1) if device == "cuda" else torch_threads_for(cpus, request.torch_threads)
    return Placement(device, cpus, gpus, threads, task_cpus, actors)


def torch_threads_for(cpus: float, requested: int = 0) -> int:
    """Intra-op threads for a CPU actor: the requested count, else its CPU share rounded up."""
    return requested if requested > 0 else max(1, math.ceil(cpus))
