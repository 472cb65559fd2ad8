"""The symmetric self search: every row's top-k among the other rows.

:func:`self_topk` runs every block product of :func:`~clipaudit.knn.blocks.self_pairs` through one
:class:`SelfSearch`, so only the upper triangle of block pairs is multiplied: about half the flops of a one-sided
search such as faiss ``IndexFlatIP``. A distributed search gives each worker its own :class:`SelfSearch` over a
share of the pairs and combines the partial results with :func:`~clipaudit.knn.running_topk.merge_topk`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn.block_products import _Buffer, _offer_cols, _offer_rows
from clipaudit.knn.blocks import (
    DEFAULT_MEMORY_BUDGET,
    TILE,
    Pair,
    Span,
    _Block,
    _round_up,
    row_spans,
    self_block_edge,
    self_pairs,
)
from clipaudit.knn.inputs import _as_matrix, _check_k, _resolve_device, _to_device, _torch
from clipaudit.knn.running_topk import _Running

if TYPE_CHECKING:
    import torch

def self_topk(
    vectors: np.ndarray,
    k: int,
    *,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of every row among the other rows.

    Args:
        vectors: ``(N, d)`` L2-normalised vectors (converted to float32).
            Similarity is the inner product; rows are not re-normalised.
        k: neighbours per row, ``1 <= k < N``.
        block_size: rows per block (rounded up to a multiple of
            :data:`TILE`); chosen by :func:`auto_block_size` if None.
        device: torch device for the products, default CPU.
        dtype: dtype of the products: float32 by default on CPU, float16 by
            default on CUDA; float16, bfloat16 and float32 everywhere (low
            precision on a CPU is slow: it is there to test that path, see
            :func:`self_topk_exact`).
        memory_budget: bytes for one similarity block when ``block_size`` is
            None.

    Returns:
        ``(ids, sims)``: int64 and float32 arrays of shape ``(N, k)``. Row i
        lists its neighbours by similarity descending, ties by smaller index
        first. Only index i itself is excluded, so an exact duplicate of row
        i is still its neighbour (with similarity 1).

    Raises:
        ValueError: input not 2-D, empty, not finite, or ``k`` out of range.
    """
    x = _as_matrix(vectors, "vectors")
    n = x.shape[0]
    k = _check_k(k, n - 1, f"k={k} must be smaller than N={n}: each row excludes itself")
    block = self_block_edge(n, block_size=block_size, device=device, dtype=dtype, memory_budget=memory_budget)
    search = SelfSearch(x, k, block, device=device, dtype=dtype)
    search.run(self_pairs(n, block))
    return search.result()


class SelfSearch:
    """The running top-k of a self search over any subset of its block products.

    :func:`self_topk` runs every pair of :func:`self_pairs` through one search.
    A distributed search gives each worker its own ``SelfSearch`` over the same
    vectors and block edge and a share of the pairs; each entry is then offered
    by exactly one worker, so :func:`merge_topk` of the workers' results is the
    result of the whole search, ids, similarities and tie order included.

    A row block first met off the diagonal has no threshold yet; it is seeded
    from the k-th largest maximum of the block's row (or column) runs, a valid
    lower bound of the row's k-th similarity, so the filter works at once.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        k: int,
        block: int,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``vectors``: ``(N, d)`` float32 (a read-only array is not copied on CPU); ``k``: neighbours per row
        (``1 <= k < N``); ``block``: the block edge of :func:`self_pairs`; device and dtype as in
        :func:`self_topk`."""
        x = _as_matrix(vectors, "vectors")
        n = x.shape[0]
        self.k = _check_k(k, n - 1, f"k={k} must be smaller than N={n}: each row excludes itself")
        self.dev, self.dtype = _resolve_device(device, dtype)
        self.x = _to_device(x, self.dev, self.dtype)
        self.state = _Running(n, self.k, self.dev)
        self.seeded = _torch().zeros(n, dtype=_torch().bool, device=self.dev)
        first = row_spans(n, block)[0]
        edge = _round_up(first[1] - first[0], TILE)
        self._buffer = _Buffer(edge * edge, self.dev, self.dtype)
        self._blocks: dict[Span, _Block] = {}

    def run(self, pairs: Iterable[Pair]) -> None:
        """Offer the entries of each block product in ``pairs`` to their rows' (and columns') top-k."""
        for rows_span, cols_span in pairs:
            rows = self._block(rows_span)
            if rows_span == cols_span:
                prod = self._buffer.product(rows, rows, diagonal=True)
                _offer_rows(self.state, prod, rows, rows, seed="full")
                self.seeded[rows.start : rows.stop] = True
                continue
            cols = self._block(cols_span)
            prod = self._buffer.product(rows, cols, col_runs=True)
            _offer_rows(self.state, prod, rows, cols, seed=None if self._is_seeded(rows) else "runs")
            _offer_cols(self.state, prod, rows, cols, seed=not self._is_seeded(cols))
            self.seeded[rows.start : rows.stop] = True
            self.seeded[cols.start : cols.stop] = True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sims)`` of shape ``(N, k)`` on the host; rows not reached by any pair hold ids ``2**31 - 1``
        and similarities ``-inf``."""
        return self.state.result()

    def _is_seeded(self, blk: _Block) -> bool:
        return bool(self.seeded[blk.start : blk.stop].all())

    def _block(self, span: Span) -> _Block:
        blk = self._blocks.get(span)
        if blk is None:
            start, stop = span
            data = self.x[start:stop]
            pad = -(stop - start) % TILE
            if pad:
                data = _torch().nn.functional.pad(data, (0, 0, 0, pad))
            blk = self._blocks[span] = _Block(data, start, stop)
        return blk
