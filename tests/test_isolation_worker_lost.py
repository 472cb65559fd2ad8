"""Rows behind a run whose worker died: run again in halves, down to the row that kills its worker every time,
which becomes a ``worker_lost`` reject (no Ray here: a fake run that "dies" when it meets a poison row; the same
function wraps every Ray map in clipaudit.runtime). The end-to-end case on Ray is in test_hostile_corpus.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipaudit.stages.isolation import LOST, LOST_FLAG, bisect_stream


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
