"""The blocks of the search: their edge, their rows, and the schedule of block products.

The similarity matrix is never held whole: it is computed one ``block x block`` tile at a time, so memory is
O(block^2 + N * k) on top of the input. :func:`auto_block_size` chooses the edge from a memory budget (capped
where the matrix product is already at its peak), :func:`row_spans` cuts the rows into near-equal spans of at
most that edge, each but the last a multiple of :data:`TILE` rows, and :class:`_Block` holds the rows of one span
zero-padded to a multiple of :data:`TILE` (:func:`_split`).

A self search multiplies only the upper triangle of block pairs: the tile ``X_I @ X_J.T`` (I < J) serves the rows
of block I and, read down its columns, the rows of block J. :func:`self_pairs` lists those products (the diagonal
blocks first, large ones halved), :func:`self_tasks` cuts them into units of work for a distributed search, and
:func:`pair_work` and :func:`self_topk_work` count the similarities they compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn.inputs import _resolve_device, _torch

if TYPE_CHECKING:
    import torch

TILE = 64
"""Length of the row runs whose maxima pre-filter a block; blocks are padded to it."""

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes allowed for one similarity block when ``block_size`` is not given."""

_MAX_BLOCK = {"cpu": 4096, "cuda": 16384}
_MIN_BLOCKS = 6
_MIN_SPLIT = 1024


Span = tuple[int, int]
"""Rows ``start:stop`` of the matrix."""

Pair = tuple[Span, Span]
"""One block product of a self search: ``(rows, cols)``; ``rows == cols`` is a diagonal block."""


def auto_block_size(
    n_rows: int,
    n_cols: int | None = None,
    *,
    device: str = "cpu",
    itemsize: int = 4,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Choose the block edge for an ``n_rows x n_cols`` similarity search.

    The block (``block x block`` similarities of ``itemsize`` bytes) must fit
    in ``memory_budget``; it is capped at 4096 on CPU, where ``sgemm`` is
    already at its peak, and 16384 on CUDA. Smaller problems get blocks of
    about N/6 rows (at least 1024), since the diagonal blocks of a self search
    cost extra work. The result is a multiple of :data:`TILE`.
    """
    if memory_budget < TILE * TILE * itemsize:
        raise ValueError(
            f"memory_budget={memory_budget} bytes is too small: one {TILE}x{TILE} "
            f"block of {itemsize}-byte similarities needs {TILE * TILE * itemsize}"
        )
    n_cols = n_rows if n_cols is None else n_cols
    by_budget = int(math.isqrt(memory_budget // itemsize))
    cap = _MAX_BLOCK.get(device, _MAX_BLOCK["cpu"])
    by_size = max(1024, _ceil_div(max(n_rows, n_cols), _MIN_BLOCKS))
    block = min(by_budget, cap, by_size)
    return max(TILE, block // TILE * TILE)


def self_block_edge(
    n: int,
    *,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """The block edge :func:`self_topk` uses for ``n`` rows with these arguments."""
    dev, mm_dtype = _resolve_device(device, dtype)
    return _block_edge(block_size, n, n, dev, mm_dtype, memory_budget)


def cross_block_edge(
    n_queries: int,
    n_corpus: int,
    *,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """The block edge :func:`cross_topk` uses with these arguments. Searching the queries of each
    :func:`row_spans` span separately with it gives the same products, hence the same result."""
    dev, mm_dtype = _resolve_device(device, dtype)
    return _block_edge(block_size, n_queries, n_corpus, dev, mm_dtype, memory_budget)


def _block_edge(
    block_size: int | None, n_rows: int, n_cols: int, dev: torch.device, dtype: torch.dtype, memory_budget: int
) -> int:
    """The block edge: ``block_size`` rounded up to :data:`TILE`, or automatic."""
    if block_size is None:
        itemsize = _torch().empty((), dtype=dtype).element_size()
        return auto_block_size(n_rows, n_cols, device=dev.type, itemsize=itemsize, memory_budget=memory_budget)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
    return _round_up(int(block_size), TILE)


def self_topk_work(n: int, *, block_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Number of similarities :func:`self_topk` computes for ``n`` rows on CPU
    (padding included): about ``n**2 / 2``, against ``n**2`` for a one-sided
    search. Its matmul flops are ``2 * d`` times this."""
    block = self_block_edge(n, block_size=block_size, memory_budget=memory_budget)
    return sum(pair_work(pair) for pair in self_pairs(n, block))


def row_spans(n: int, block: int) -> list[Span]:
    """``range(n)`` cut into near-equal spans of at most ``block`` rows, each but
    the last a multiple of :data:`TILE` (the first is never smaller than a later one)."""
    edge = _round_up(_ceil_div(n, _ceil_div(n, block)), TILE)
    return [(start, min(start + edge, n)) for start in range(0, n, edge)]


def self_pairs(n: int, block: int) -> list[Pair]:
    """The block products of a self search of ``n`` rows, in :func:`self_topk`'s
    order: first each diagonal block with itself (seeding the thresholds), then
    every pair above the diagonal once. Together they cover every (row, column)
    entry exactly once, whichever of its two sides reads it.

    A diagonal block of at least ``2 * _MIN_SPLIT`` rows is halved into two
    diagonal blocks and the product of the halves, so that three quarters of
    the symmetric ``blk @ blk.T`` are computed instead of all of it.
    """
    spans = row_spans(n, block)
    pairs = [pair for span in spans for pair in _diagonal_pairs(span)]
    pairs.extend((rows, cols) for i, rows in enumerate(spans) for cols in spans[i + 1 :])
    return pairs


def self_tasks(n: int, block: int, workers: int, per_worker: int = 32) -> list[list[Pair]]:
    """:func:`self_pairs` cut into units of work for ``workers`` workers: first one unit per row block with
    its diagonal products, then the pairs above the diagonal of each row block in units of equal count, about
    ``per_worker`` units per worker in all, so that workers that pull units as they finish stay balanced."""
    spans = row_spans(n, block)
    tasks = [list(_diagonal_pairs(span)) for span in spans]
    above = [[(rows, cols) for cols in spans[i + 1 :]] for i, rows in enumerate(spans)]
    size = max(1, _ceil_div(sum(map(len, above)), max(1, workers) * per_worker))
    for row_pairs in above:
        tasks.extend(row_pairs[i : i + size] for i in range(0, len(row_pairs), size))
    return tasks


def pair_work(pair: Pair) -> int:
    """Similarities one block product computes (padding included)."""
    (r0, r1), (c0, c1) = pair
    return _round_up(r1 - r0, TILE) * _round_up(c1 - c0, TILE)


def _diagonal_pairs(span: Span) -> Iterator[Pair]:
    start, stop = span
    half = _round_up(stop - start, TILE) // 2 // TILE * TILE
    if half < _MIN_SPLIT or stop - start <= half:
        yield span, span
        return
    head, tail = (start, start + half), (start + half, stop)
    yield from _diagonal_pairs(head)
    yield from _diagonal_pairs(tail)
    yield head, tail


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, multiple: int) -> int:
    return _ceil_div(a, multiple) * multiple


class _Block:
    """Rows ``start:stop`` of a matrix, zero-padded to a multiple of TILE rows."""

    def __init__(self, data: torch.Tensor, start: int, stop: int) -> None:
        self.data = data
        self.start = start
        self.stop = stop

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def padded(self) -> int:
        return self.data.shape[0]


def _split(x: torch.Tensor, block: int) -> list[_Block]:
    """Split rows into the blocks of :func:`row_spans`, zero-padded to TILE rows."""
    blocks = []
    for start, stop in row_spans(x.shape[0], block):
        data = x[start:stop]
        pad = -(stop - start) % TILE
        if pad:
            data = _torch().nn.functional.pad(data, (0, 0, 0, pad))
        blocks.append(_Block(data, start, stop))
    return blocks
