"""Per-row fault isolation for batch work: when a whole batch raises, split it in halves down to the rows that
raise alone, so that one bad row becomes one reject and the rest of the batch is still computed.

:func:`run_isolated` is plain Python (no Ray, no torch). The model actors use it around their forwards
(:class:`~clipaudit.stages.embed_batches.ImageEncoder`, :class:`~clipaudit.stages.embed_batches.TextEncoder`,
:class:`~clipaudit.stages.tcac_batches.TransformedEncoder`) and around the transforms; a batch that fails as a
whole for a reason that does not depend on one row (an out-of-memory error of a too-large batch) is recomputed in
smaller parts the same way. Retries are bounded: a batch of ``n`` rows costs at most ``2n - 1`` calls (the nodes
of a binary tree with ``n`` leaves); one bad row among ``n`` costs about ``2 log2(n)`` extra calls.

Workers that die (a segfault in a native decoder, the OOM killer) are left to Ray Data's own retries: an
exception never escapes these batch functions for one row, so what reaches Ray is a system failure, which Ray Data
retries by default (tasks ``max_retries=-1``; actor pools ``max_restarts=-1``, ``max_task_retries=-1``), without
bound. Bounding them was tried and dropped: Ray 2.60 takes ``max_retries`` / ``max_task_retries`` only through
``map_batches``' deprecated ``**ray_remote_args`` (removal announced for 2.64), and with them set Ray core prints
an ERROR line on every run (ray-project/ray#53727), which a normal run must not show. So a row that kills its
worker every time would be retried without end; that case is open. ``actor_task_retry_on_errors`` stays
``False``: an application exception that escapes a batch function is a bug, and retrying it repeats it.
``max_errored_blocks`` stays 0: Ray Data drops the rows of an errored block without a trace, which would break
``in = embedded + rejected``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
