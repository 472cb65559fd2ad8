"""Why a distributed run failed: a row, a lost node, or the cluster itself.

:func:`~clipaudit.batches.isolation.bisect_stream` reruns the rows of a failed run; what it does depends on the
answer of a :class:`FailureClassifier`:

* **infrastructure** (the stage stops, no row is written as a reject): clipaudit's own cluster errors (a
  placement refused, an autoscaler that did not deliver), actors that never started (Ray Data's "Timed out while
  starting actors"), actors or tasks that cannot be scheduled at all, a runtime environment that cannot be set
  up; and, when no node was seen dying, the connection to the cluster gone (a system error, the local raylet
  dead);
* **node lost** (the rows not back yet run again, whole): an actor that died because its node was preempted, a
  ``NodeDiedError``, or any worker death while a node that this run had seen alive is now dead. Ray's GCS marks a
  killed node dead only after its health checks fail (about 15 s), so a node whose raylet no longer accepts a TCP
  connection counts as dead at once; the classifier then waits (at most :data:`NODE_DEATH_WAIT_S`) until the GCS
  agrees, so that the rerun is not scheduled on the dead node (whose actors would never start, and fail the rerun
  when the GCS marks it dead). A later failure whose error names a node already found lost (an actor that "died
  because its node has died") is a node loss too, not a row's;
* **row** (halved down to the row that kills its worker): any other worker death, with every node still there.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

from clipaudit.batches.isolation import INFRASTRUCTURE, NODE_LOST, ROW, FailureKind
from clipaudit.errors import ClipauditError

CONNECT_TIMEOUT_S = 1.0
"""How long a raylet's port is given to accept a connection before its node counts as gone."""
NODE_DEATH_WAIT_S = 45.0
"""How long a node loss waits for the GCS to mark the lost nodes dead (its health checks take about 15 s) before
the rows run again."""
POLL_S = 0.5

log = logging.getLogger("clipaudit.runtime")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the causes Ray wraps in a ``RayTaskError``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])


def _is_infrastructure(exc: BaseException) -> bool:
    """Errors that say the stage cannot run on this cluster, whatever its nodes do."""
    import ray.exceptions as rex

    if isinstance(exc, ClipauditError):
        return True
    if isinstance(exc, rex.GetTimeoutError) and "starting actors" in str(exc):
        return True
    return isinstance(exc, rex.ActorUnschedulableError | rex.TaskUnschedulableError | rex.RuntimeEnvSetupError
                      | rex.AuthenticationError)


def _is_cluster_gone(exc: BaseException) -> bool:
    """Errors of a cluster that stopped answering (when no node of it was seen dying)."""
    import ray.exceptions as rex

    return isinstance(exc, ConnectionError | rex.LocalRayletDiedError | rex.RaySystemError)


def _says_node_lost(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, rex.NodeDiedError) or bool(getattr(exc, "preempted", False))


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


class FailureClassifier:
    """Classifies the failures of one stage's runs; remembers every node it has seen alive, so a node lost after
    the first look counts once."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, int]] = {}
        self.gone: set[str] = set()
        self.look()

    def look(self) -> set[str]:
        """Refresh the nodes seen alive; returns the ids of known nodes newly found dead or unreachable."""
        import ray

        newly: set[str] = set()
        for node in ray.nodes():
            node_id = node["NodeID"]
            if node.get("Alive"):
                self.known.setdefault(node_id, (node["NodeManagerAddress"], int(node["NodeManagerPort"])))
            elif node_id in self.known and node_id not in self.gone:
                newly.add(node_id)
        for node_id, (address, port) in self.known.items():
            if node_id not in self.gone and node_id not in newly and not _reachable(address, port):
                newly.add(node_id)
        self.gone |= newly
        return newly

    def _names_lost_node(self, exc: BaseException) -> bool:
        """Whether ``exc`` names a node found lost (Ray's "The actor died because its node has died. Node Id: ...")."""
        text = str(exc)
        return any(node_id in text for node_id in self.gone)

    def wait_marked_dead(self) -> float:
        """Wait until no node found lost is still alive for the GCS, or its raylet answers again (then it was not
        lost); at most :data:`NODE_DEATH_WAIT_S`. Returns the seconds waited."""
        import ray

        started = time.monotonic()
        while time.monotonic() - started < NODE_DEATH_WAIT_S:
            try:
                nodes = ray.nodes()
            except Exception:  # noqa: BLE001 - the cluster does not answer: nothing to wait for
                break
            if not any(node["NodeID"] in self.gone and node.get("Alive")
                       and not _reachable(node["NodeManagerAddress"], int(node["NodeManagerPort"]))
                       for node in nodes):
                break
            time.sleep(POLL_S)
        return time.monotonic() - started

    def __call__(self, exc: BaseException) -> FailureKind:
        chain = list(_chain(exc))
        if any(_is_infrastructure(e) for e in chain):
            return INFRASTRUCTURE
        try:
            newly = self.look()
        except Exception:  # noqa: BLE001 - the cluster does not answer: it is gone
            return INFRASTRUCTURE
        if newly or any(_says_node_lost(e) or self._names_lost_node(e) for e in chain):
            waited = self.wait_marked_dead()
            lost = ", ".join(sorted(node_id[:8] for node_id in newly)) or "a node found lost before"
            log.warning("node lost (%s: %s); the rows not back yet run again%s", lost, type(exc).__name__,
                        f" (waited {waited:.0f} s for the cluster to mark it dead)" if waited >= 1 else "")
            return NODE_LOST
        if any(_is_cluster_gone(e) for e in chain):
            return INFRASTRUCTURE
        return ROW
