"""How a failed distributed run is read (clipaudit.runtime.failures): the cluster's own errors stop the stage
without a reject, a lost node reruns the rows, anything else on a healthy cluster is a row failure to isolate.
On the session's local Ray, whose one node stays alive; the lost-node cases on two nodes are in
test_lost_nodes.py."""

from __future__ import annotations

import pytest

from clipaudit.batches.isolation import INFRASTRUCTURE, NODE_LOST, ROW
from clipaudit.placement import PlacementError
from clipaudit.runtime.failures import FailureClassifier

pytestmark = pytest.mark.ray


def test_failures_are_told_apart(ray_local) -> None:
    from ray.exceptions import ActorUnschedulableError, GetTimeoutError, NodeDiedError, WorkerCrashedError

    classify = FailureClassifier()
    assert classify.known, "the nodes alive when the stage began are remembered"
    assert classify(PlacementError("no node has that")) == INFRASTRUCTURE
    assert classify(GetTimeoutError("Timed out while starting actors. This may mean ...")) == INFRASTRUCTURE
    assert classify(ActorUnschedulableError("no node can ever hold it")) == INFRASTRUCTURE
    assert classify(NodeDiedError("node 10.0.0.2 died")) == NODE_LOST
    assert classify(WorkerCrashedError()) == ROW, "a worker died and every node is alive: a row killed it"
    try:
        raise RuntimeError("batch failed") from WorkerCrashedError()
    except RuntimeError as wrapped:
        assert classify(wrapped) == ROW
    try:
        raise RuntimeError("map failed") from PlacementError("refused")
    except RuntimeError as wrapped:
        assert classify(wrapped) == INFRASTRUCTURE, "a cause anywhere in the chain counts"


def test_a_node_whose_raylet_stops_answering_counts_as_lost_at_once(ray_local) -> None:
    classify = FailureClassifier()
    node_id = next(iter(classify.known))
    classify.known[node_id] = ("127.0.0.1", 1)  # a port nothing listens on: as a killed raylet's
    assert classify(RuntimeError("worker died")) == NODE_LOST
    assert classify(RuntimeError("worker died")) == ROW, "one lost node counts once"
