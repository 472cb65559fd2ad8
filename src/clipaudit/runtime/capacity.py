"""What the cluster offers, now and once its autoscaler has grown it; asking for the nodes a plan needs.

:meth:`Capacity.place` plans a pool (:func:`clipaudit.placement.plan_placement`) against the nodes alive now. When
that fails:

* on a fixed cluster (no autoscaler), the plan's error goes up at once, before any work is submitted;
* on a cluster with an autoscaler, the plan is made against the nodes alive plus the node types the autoscaler
  may launch (an error at once if even those cannot hold it), then asked for as a placement group of the plan's
  bundles (one per actor, one for a decode task). The autoscaler sees the pending group as demand and launches
  nodes; once the group is placed (the nodes are there) it is removed and the plan is made again against the
  nodes alive. The wait is bounded by ``ray.autoscale_timeout_s``; past it, a :class:`PlacementError` says what
  was asked, what came and how long it waited.

A placement group rather than ``ray.autoscaler.sdk.request_resources``: that call sets the cluster's one standing
request, which Ray Data's own autoscaling coordinator also sets (and overwrites) while a dataset runs; a pending
placement group is demand of its own that nothing else overwrites, and it is gone once removed, so a job that
ends holds nothing and the autoscaler takes every worker back after its idle timeout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from clipaudit.placement import (
    DEFAULT_CPU_SHARE,
    TASK_CPUS,
    NodeShape,
    Placement,
    PlacementError,
    PoolRequest,
    choose_device,
    nodes_text,
    plan_placement,
)
from clipaudit.runtime.autoscaler import Autoscaler, read_autoscaler
from clipaudit.runtime.session import check_private_session_dirs

if TYPE_CHECKING:
    from clipaudit.config import RayConfig

log = logging.getLogger("clipaudit.runtime")

POLL_S = 1.0
"""Seconds between two looks at the nodes while waiting for the autoscaler."""


def alive_shapes() -> list[NodeShape]:
    """Every alive node that offers CPU or GPU. Raises PlacementError when two nodes share one session folder
    (see :func:`~clipaudit.runtime.session.check_private_session_dirs`)."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    check_private_session_dirs(alive)
    return [NodeShape(f"node {node['NodeManagerAddress']} {node['NodeID'][:8]}", node["Resources"].get("CPU", 0.0),
                      node["Resources"].get("GPU", 0.0))
            for node in alive if node["Resources"].get("CPU", 0.0) or node["Resources"].get("GPU", 0.0)]


class Capacity:
    """Plans the pools of one job and obtains their nodes (see the module docstring)."""

    def __init__(self, ray_config: RayConfig) -> None:
        self.timeout_s = ray_config.autoscale_timeout_s
        self._groups: list[object] = []
        self._scaler: Autoscaler | None = None
        self._scaler_read = False

    def autoscaler(self) -> Autoscaler | None:
        """The cluster's autoscaler, or None for a cluster that cannot grow (see :mod:`clipaudit.runtime.
        autoscaler`); read once per job (it scans this machine's processes), since a job's cluster keeps it."""
        if not self._scaler_read:
            self._scaler = read_autoscaler()
            self._scaler_read = True
        return self._scaler

    def device(self, setting: str) -> str:
        """Where model forwards will run: ``cuda`` when a node alive or launchable has a GPU (and ``setting``
        allows); no error here (a placement says what is missing)."""
        scaler = self.autoscaler()
        nodes = alive_shapes() + list(scaler.node_types if scaler else ())
        return "cuda" if setting != "cpu" and any(node.gpus for node in nodes) else "cpu"

    def describe(self) -> str:
        """The nodes alive, and the node types an autoscaler may launch."""
        scaler = self.autoscaler()
        alive = alive_shapes()
        text = f"{len(alive)} node(s): {nodes_text(alive)}"
        if scaler is not None:
            types = nodes_text(scaler.node_types) if scaler.node_types else "node types not reported"
            text += f"; autoscaler {scaler.version}: {types}"
        return text

    def place(self, request: PoolRequest) -> Placement:
        """The placement of ``request`` on nodes that are there (waiting for an autoscaler when it can grow the
        cluster); PlacementError when it cannot be had. A pool of as many actors as fit (``actors`` None) asks an
        autoscaler for ``max_actors`` (or one), then takes what the nodes that came hold."""
        alive = alive_shapes()
        scaler = self.autoscaler()
        launchable = list(scaler.node_types) if scaler else []
        request = replace(request, device_setting=choose_device(alive + launchable, request.device_setting))
        try:
            return plan_placement(alive, request)
        except PlacementError as refused:
            if scaler is None:
                raise PlacementError(f"{refused} (the cluster has no autoscaler: it cannot grow)") from None
            first_error = refused
        fill = request.actors is None
        sized = replace(request, actors=request.max_actors or 1) if fill else request
        target = plan_placement(alive + launchable, sized) if launchable else _assumed(sized)
        sized = replace(sized, cpus_per_actor=target.cpus_per_actor)
        placement = self._grow_and_place(sized, target, first_error)
        if not fill:
            return placement
        return plan_placement(alive_shapes(), replace(request, cpus_per_actor=target.cpus_per_actor))

    def _grow_and_place(self, request: PoolRequest, target: Placement, first_error: PlacementError) -> Placement:
        """Ask for ``target``'s bundles as a placement group, wait for it (bounded), then plan on the nodes alive."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundles = target.bundles()
        log.info("%s: %s; asking the autoscaler for %s and waiting up to %d s", request.what, first_error,
                 target.describe(), self.timeout_s)
        group = placement_group(bundles, strategy="PACK", name="clipaudit-capacity")
        self._groups.append(group)
        started = time.monotonic()
        try:
            ready = group.wait(timeout_seconds=self.timeout_s)
        finally:
            remove_placement_group(group)
            self._groups.remove(group)
        last: PlacementError | None = None
        deadline = started + self.timeout_s
        while ready:
            try:
                placement = plan_placement(alive_shapes(), request)
            except PlacementError as refused:
                last = refused
                if time.monotonic() >= deadline:
                    break
                time.sleep(POLL_S)
                continue
            log.info("%s: the autoscaler delivered in %.1f s: %s", request.what, time.monotonic() - started,
                     nodes_text(alive_shapes()))
            return placement
        waited = time.monotonic() - started
        raise PlacementError(
            f"asked the autoscaler for {_bundles_text(bundles)} ({target.describe()}) and waited {waited:.0f} s "
            f"(ray.autoscale_timeout_s): {'they came, but ' + str(last) if last else 'they did not come'}. The "
            f"cluster now has: {nodes_text(alive_shapes())}; free: {ray.available_resources()}. Check the "
            "autoscaler's node types and quota (`ray status`), or raise ray.autoscale_timeout_s")

    def release(self) -> None:
        """Remove any placement group still asked for (a wait interrupted); the job then holds nothing."""
        from ray.util.placement_group import remove_placement_group

        for group in self._groups:
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - the cluster may be gone already: nothing is held there then
                log.debug("could not remove placement group %s", group, exc_info=True)
        self._groups.clear()


def _assumed(request: PoolRequest) -> Placement:
    """The placement ``request`` would have on nodes big enough for it: what to ask an autoscaler that does not
    report its node types for."""
    gpu = request.device_setting == "cuda"
    cpus = request.cpus_per_actor if request.cpus_per_actor is not None else DEFAULT_CPU_SHARE
    cpus = min(cpus, request.gpu_cpus) if gpu else cpus
    actors = request.actors if request.actors is not None else 1
    return Placement(request.device_setting if gpu else "cpu", cpus, request.gpus_per_actor if gpu else 0.0,
                     1, TASK_CPUS if request.with_tasks else 0.0, actors)


def _bundles_text(bundles: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for bundle in bundles:
        key = " + ".join(f"{value:g} {name}" for name, value in bundle.items())
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {{{key}}}" for key, n in counts.items())
