"""Rows behind a run whose worker died: run again in halves, down to the row that kills its worker every time,
which becomes a ``worker_lost`` reject (no Ray here: a fake run that "dies" when it meets a poison row; the same
function wraps every Ray map in clipaudit.runtime). The end-to-end case on Ray is in test_hostile_corpus.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipaudit.batches.isolation import (
    INFRASTRUCTURE,
    KILLS_WORKER,
    LOST,
    LOST_BEFORE,
    LOST_FLAG,
    NODE_LOST,
    RETRYABLE_REASONS,
    ROW,
    InfrastructureError,
    bisect_stream,
    reopen_retryable,
)
from clipaudit.placement import PlacementError


class Poisoned:
    """A run over rows of ``id`` in blocks of ``block``: yields each block's batch; dies (raises) at the first
    block holding a poison id, after the blocks before it came back."""

    def __init__(self, poison: set[int], block: int = 4) -> None:
        self.poison, self.block, self.runs = poison, block, 0

    def __call__(self, part: pa.Table):
        self.runs += 1
        for start in range(0, part.num_rows, self.block):
            ids = part.column("id").to_pylist()[start:start + self.block]
            if self.poison & set(ids):
                raise RuntimeError("worker died: SIGSEGV")
            yield {"id": np.asarray(ids), "status": np.full(len(ids), "ok", dtype=object)}


def _run(n: int, poison: set[int], block: int = 4) -> tuple[dict[int, str], Poisoned]:
    run = Poisoned(poison, block)
    out: dict[int, str] = {}
    for batch in bisect_stream(run, pa.table({"id": list(range(n)), "uri": [f"u{i}" for i in range(n)]}), "id"):
        for i, status in zip(batch["id"].tolist(), batch["status"].tolist()):
            assert i not in out, f"row {i} came back twice"
            out[i] = status
        if LOST_FLAG in batch:
            assert batch["uri"].tolist() == [f"u{i}" for i in batch["id"].tolist()], "lost rows keep their columns"
            assert all("RuntimeError: worker died" in d for d in batch["detail"].tolist())
    return out, run


@pytest.mark.parametrize("poison", [set(), {0}, {13}, {39}, {5, 6}, {3, 30}])
def test_every_row_comes_back_once_and_only_poison_rows_are_lost(poison):
    out, run = _run(40, poison)
    assert sorted(out) == list(range(40))
    assert {i for i, status in out.items() if status == LOST} == poison


def test_reruns_are_bounded_by_the_halving():
    out, run = _run(1024, {700}, block=16)
    assert [i for i, s in out.items() if s == LOST] == [700]
    assert run.runs <= 2 * 10 + 1, f"{run.runs} runs for one poison row in 1024"


def test_a_failure_after_every_row_came_back_loses_nothing():
    def run(part: pa.Table):
        yield {"id": np.asarray(part.column("id").to_pylist()), "status": np.full(part.num_rows, "ok", dtype=object)}
        raise RuntimeError("shutdown hiccup")

    batches = list(bisect_stream(run, pa.table({"id": [1, 2, 3]}), "id"))
    assert len(batches) == 1 and batches[0]["id"].tolist() == [1, 2, 3]


class NodeLostOnce:
    """A run that loses "a node" once, after ``after`` rows came back: the rest must be run again, whole."""

    def __init__(self, after: int) -> None:
        self.after, self.runs, self.sizes = after, 0, []

    def __call__(self, part: pa.Table):
        self.runs += 1
        self.sizes.append(part.num_rows)
        ids = part.column("id").to_pylist()
        for start in range(0, len(ids), 4):
            if self.runs == 1 and start >= self.after:
                raise ConnectionResetError("node 10.0.0.2 went away")
            yield {"id": np.asarray(ids[start:start + 4]), "status": np.full(len(ids[start:start + 4]), "ok",
                                                                              dtype=object)}


def test_a_lost_node_reruns_the_rest_whole_and_rejects_nothing():
    run = NodeLostOnce(after=8)
    batches = list(bisect_stream(run, pa.table({"id": list(range(20))}), "id", classify=lambda exc: NODE_LOST,
                                 node_loss_retries=1))
    ids = [i for batch in batches for i in batch["id"].tolist()]
    assert sorted(ids) == list(range(20)) and not any(LOST_FLAG in batch for batch in batches)
    assert run.sizes == [20, 12], "the rows not back yet ran again as one run, not in halves"


def test_node_losses_past_the_limit_stop_the_stage_without_a_reject():
    def run(part: pa.Table):
        yield {"id": np.asarray(part.column("id").to_pylist()[:1]), "status": np.array(["ok"], dtype=object)}
        raise ConnectionResetError("node lost")

    got = []
    with pytest.raises(InfrastructureError, match=r"3 node losses in one stage, more than ray.node_loss_retries \(2\)"):
        for batch in bisect_stream(run, pa.table({"id": list(range(10))}), "id", classify=lambda exc: NODE_LOST,
                                   node_loss_retries=2):
            got.append(batch)
    assert all(LOST_FLAG not in batch for batch in got)


def test_an_infrastructure_failure_is_raised_and_no_row_is_rejected():
    def run(part: pa.Table):
        raise PlacementError("a model actor needs 0.5 CPU on one node, and no node has that")
        yield  # pragma: no cover

    with pytest.raises(PlacementError, match="no node has that"):
        list(bisect_stream(run, pa.table({"id": list(range(10))}), "id", classify=lambda exc: INFRASTRUCTURE))

    def gone(part: pa.Table):
        raise OSError("GCS unreachable")
        yield  # pragma: no cover

    with pytest.raises(InfrastructureError, match="nothing was rejected") as caught:
        list(bisect_stream(gone, pa.table({"id": [1]}), "id", classify=lambda exc: INFRASTRUCTURE))
    assert isinstance(caught.value.__cause__, OSError)


def test_a_row_lost_again_after_a_retry_is_final():
    todo = pa.table({"id": list(range(12)), LOST_BEFORE: [i in (3, 7) for i in range(12)]})
    statuses: dict[int, str] = {}
    for batch in bisect_stream(Poisoned({3, 9}), todo, "id", classify=lambda exc: ROW):
        assert LOST_BEFORE not in batch, "the mark is not passed to the run"
        statuses.update(zip(batch["id"].tolist(), batch["status"].tolist()))
    assert {i: s for i, s in statuses.items() if s != "ok"} == {3: KILLS_WORKER, 9: LOST}
    assert RETRYABLE_REASONS == {LOST}


def test_retryable_rejects_are_reopened_and_final_ones_stay(tmp_path):
    from clipaudit.io.tables import RunTables
    from clipaudit.records import REJECTS, REJECTS_KEY, REJECTS_SCHEMA

    tables = RunTables(str(tmp_path / "run"))
    rows = [("embed", "a", LOST), ("embed", "b", KILLS_WORKER), ("embed", "c", "undecodable"), ("tcac", "d", LOST)]
    tables.insert_new(REJECTS, pa.Table.from_pylist(
        [{"source": f"{item}.png", "item": item, "stage": stage, "reason": reason, "detail": ""}
         for stage, item, reason in rows], schema=REJECTS_SCHEMA), REJECTS_KEY, REJECTS_SCHEMA)
    assert reopen_retryable(tables, "embed") == {"a"}
    left = sorted(tables.read(REJECTS, ["item"]).column("item").to_pylist())
    assert left == ["b", "c", "d"]
    assert reopen_retryable(tables, "embed") == set()
    assert reopen_retryable(tables, "tcac") == {"d"}
