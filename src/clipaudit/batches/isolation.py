"""Per-row fault isolation for batch work: when a whole batch raises, split it in halves down to the rows that
raise alone, so that one bad row becomes one reject and the rest of the batch is still computed.

:func:`run_isolated` is plain Python (no Ray, no torch). The model actors use it around their forwards
(:class:`~clipaudit.batches.embed.ImageEncoder`, :class:`~clipaudit.batches.embed.TextEncoder`,
:class:`~clipaudit.batches.tcac.TransformedEncoder`) and around the transforms; a batch that fails as a
whole for a reason that does not depend on one row (an out-of-memory error of a too-large batch) is recomputed in
smaller parts the same way. Retries are bounded: a batch of ``n`` rows costs at most ``2n - 1`` calls (the nodes
of a binary tree with ``n`` leaves); one bad row among ``n`` costs about ``2 log2(n)`` extra calls.

Workers that die (a segfault in a native decoder, the OOM killer) are retried a bounded number of times: Ray re-runs
a CPU task ``ray.task_retries`` times; a model actor is not restarted (``max_restarts=0``: Ray Data's default is to
restart actors and retry their tasks without end, which hangs a run on a row that kills its worker every time,
and an explicit restart count makes Ray core log an error line on every run, ray-project/ray#53727). When a run
fails, :func:`bisect_stream` asks why (a classifier from :mod:`clipaudit.runtime.failures`): a failure of the
cluster itself (a placement refused, actors that never start, the cluster gone) stops the stage and rejects no
row; a lost node costs one rerun of the rows not back yet, whole; any other worker death runs those rows again, in
halves, down to single rows, and a row that fails alone becomes a ``worker_lost`` reject. That reason is
retryable (:data:`~clipaudit.records.RETRYABLE_REASONS`): the next run of the run_dir tries the row again
(:func:`reopen_retryable`), and a row lost alone a second time is ``kills_worker``, final.
``actor_task_retry_on_errors`` stays ``False``: an application exception that escapes a batch function is a bug,
and retrying it repeats it. ``max_errored_blocks`` stays 0: Ray Data drops the rows of an errored block without a
trace, which would break ``in = embedded + rejected``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.records import KILLS_WORKER, REJECTS, RETRYABLE_REASONS, WORKER_LOST


def describe(exc: BaseException, what: str = "") -> str:
    """A reject detail: what failed, then the exception's type and message (``forward: RuntimeError: ...``)."""
    prefix = f"{what}: " if what else ""
    return f"{prefix}{type(exc).__name__}: {exc}"


@dataclass
class Isolated:
    """What :func:`run_isolated` found: a result per row (None where it failed), the exception of each failed
    row, and the number of calls made."""

    results: list[Any]
    errors: dict[int, Exception] = field(default_factory=dict)
    calls: int = 0

    @property
    def ok(self) -> np.ndarray:
        """A bool mask of the rows that have a result."""
        mask = np.ones(len(self.results), dtype=bool)
        mask[list(self.errors)] = False
        return mask


def run_isolated(fn: Callable[[np.ndarray], Sequence[Any] | np.ndarray], n: int) -> Isolated:
    """Call ``fn`` on the row positions ``0..n-1`` (an int64 array; ``fn`` returns one result per position, in
    order); if the call raises, or returns the wrong number of results, split the positions in halves and try
    each, down to single rows. A single row that raises gets its exception recorded and no result.

    Catches ``Exception`` only (a ``KeyboardInterrupt`` still stops the work). At most ``2n - 1`` calls.
    """
    found = Isolated(results=[None] * n)
    parts = [np.arange(n, dtype=np.int64)] if n else []
    while parts:
        part = parts.pop()
        found.calls += 1
        try:
            out = fn(part)
            if len(out) != len(part):
                raise ValueError(f"{len(out)} results for {len(part)} rows")
        except Exception as exc:  # noqa: BLE001 - isolate the row(s) that raise
            if len(part) == 1:
                found.errors[int(part[0])] = exc
            else:
                middle = len(part) // 2
                parts.append(part[middle:])
                parts.append(part[:middle])
            continue
        for position, value in zip(part.tolist(), out, strict=True):
            found.results[position] = value
    return found


def stack_vectors(found: Isolated, dim: int) -> np.ndarray:
    """The results of an :func:`run_isolated` forward as a float32 ``(n, dim)`` array, zeros for failed rows."""
    vectors = np.zeros((len(found.results), dim), dtype=np.float32)
    for position, value in enumerate(found.results):
        if value is not None:
            vectors[position] = value
    return vectors


LOST = WORKER_LOST
"""Reject reason of a row whose worker died (or whose task failed past Ray's bounded retries) when it was run
alone; retryable (see :func:`reopen_retryable`)."""
LOST_FLAG = "lost"
"""Column present (True) only in the batches :func:`bisect_stream` makes for lost rows."""
LOST_BEFORE = "lost_before"
"""Optional bool column of a ``todo`` table: the row was a :data:`LOST` reject of an earlier run (a second loss
makes it :data:`KILLS_WORKER`). :func:`bisect_stream` strips it before running the rows."""

ROW = "row"
NODE_LOST = "node_lost"
INFRASTRUCTURE = "infrastructure"
FailureKind = str
"""What a failed distributed run says about its rows: :data:`ROW` (a worker died under some row: find it by
halving), :data:`NODE_LOST` (a node of the cluster went away: run the rows not back yet again, whole) or
:data:`INFRASTRUCTURE` (the cluster cannot run the stage at all: stop, and write no row)."""


class InfrastructureError(ClipauditError, RuntimeError):
    """A stage could not run for a reason of the cluster, not of its rows (a placement refused, actors that never
    started, the cluster gone, too many nodes lost). No row is written as a reject for it: the next run of the
    same run_dir does the work."""


def reopen_retryable(tables: object, stage: str) -> set[str]:
    """Delete ``stage``'s rejects of a :data:`RETRYABLE_REASONS` kind from the ``rejects`` table of ``tables`` (a
    :class:`~clipaudit.io.tables.RunTables`), so the stage plans those rows again; returns their items (for the
    :data:`LOST_BEFORE` column)."""
    reasons = ", ".join(f"'{reason}'" for reason in sorted(RETRYABLE_REASONS))
    where = f"stage = '{stage}' AND reason IN ({reasons})"
    found = tables.read(REJECTS, ["item"], where=where)
    if found is None or found.num_rows == 0:
        return set()
    tables.delete(REJECTS, where)
    return set(found.column("item").to_pylist())


def lost_batch(rows: pa.Table, detail: str, key: str = "",
               lost_before: set[Any] | frozenset[Any] = frozenset()) -> dict[str, np.ndarray]:
    """The rows of ``rows`` as a batch marked lost: their own columns, ``status`` :data:`LOST` (or
    :data:`KILLS_WORKER` for a row whose ``key`` is in ``lost_before``), ``detail``."""
    batch = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    values = rows.column(key).to_pylist() if key else [None] * rows.num_rows
    batch[LOST_FLAG] = np.ones(rows.num_rows, dtype=bool)
    batch["status"] = np.array([KILLS_WORKER if value in lost_before else LOST for value in values], dtype=object)
    batch["detail"] = np.full(rows.num_rows, detail, dtype=object)
    return batch


def bisect_stream(run: Callable[[pa.Table], Iterable[dict[str, np.ndarray]]], todo: pa.Table, key: str,
                  classify: Callable[[BaseException], FailureKind] | None = None,
                  node_loss_retries: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield the batches of ``run(todo)``; when the run raises, ``classify`` says why (every failure is a
    :data:`ROW` failure without it):

    * :data:`ROW`: a worker died past its bounded retries. The rows whose ``key`` has not come back yet are run
      again, in halves, down to single rows; a row that still fails when run alone comes back as a
      :func:`lost_batch`. The same halving as :func:`run_isolated`, one level up: for a whole distributed run
      instead of one batch, so a row that kills its worker every time costs about ``2 log2(n)`` reruns and one
      reject, never the stage.
    * :data:`NODE_LOST`: the rows not back yet are run again, whole, at most ``node_loss_retries`` times in all;
      past that, :class:`InfrastructureError`. No row is rejected for a lost node.
    * :data:`INFRASTRUCTURE`: the error goes up (a :class:`ClipauditError` as it is, anything else as an
      :class:`InfrastructureError`); no row is rejected.
    """
    lost_before: set[Any] = set()
    if LOST_BEFORE in todo.column_names:
        flags = todo.column(LOST_BEFORE).to_pylist()
        lost_before = {value for value, flag in zip(todo.column(key).to_pylist(), flags) if flag}
        todo = todo.drop_columns([LOST_BEFORE])
    pending = [todo] if todo.num_rows else []
    losses = 0
    while pending:
        part = pending.pop()
        seen: set[Any] = set()
        try:
            for batch in run(part):
                seen.update(batch[key].tolist())
                yield batch
        except Exception as exc:  # noqa: BLE001 - a failure of the run: classified below
            kind = classify(exc) if classify is not None else ROW
            if kind == INFRASTRUCTURE:
                if isinstance(exc, ClipauditError):
                    raise
                raise InfrastructureError(f"the stage stopped for a reason of the cluster, not of its rows "
                                          f"({describe(exc)}); nothing was rejected: run it again") from exc
            keys = part.column(key)
            left = part.filter(pc.invert(pc.is_in(keys, value_set=pa.array(list(seen), type=keys.type))))
            if kind == NODE_LOST:
                losses += 1
                if losses > node_loss_retries:
                    raise InfrastructureError(
                        f"{losses} node losses in one stage, more than ray.node_loss_retries ({node_loss_retries})"
                        f"; last: {describe(exc)}. Nothing was rejected: run it again") from exc
                if left.num_rows:
                    pending.append(left)
            elif part.num_rows == 1:
                yield lost_batch(part, describe(exc, "worker"), key, lost_before)
            elif left.num_rows == 1:
                pending.append(left)
            elif left.num_rows > 1:
                middle = left.num_rows // 2
                pending.extend([left.slice(middle), left.slice(0, middle)])
