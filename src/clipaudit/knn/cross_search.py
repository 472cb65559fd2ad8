"""The one-sided search: the top-k of each query row among the corpus rows.

:func:`cross_topk` multiplies every block of queries by every block of the corpus, seeding each query block's
thresholds from its product with the first corpus block; it can leave out one corpus index per query (the query
itself when queries and corpus overlap). For a set against itself
:func:`~clipaudit.knn.self_search.self_topk` gives the same result about twice as fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn.block_products import _Buffer, _excluded_pairs, _offer_rows
from clipaudit.knn.blocks import DEFAULT_MEMORY_BUDGET, _block_edge, _split
from clipaudit.knn.inputs import _resolve_device, _to_device, _torch, cross_inputs
from clipaudit.knn.running_topk import _Running

if TYPE_CHECKING:
    import torch

def cross_topk(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of each query row among corpus rows.

    Args:
        queries: ``(Q, d)`` L2-normalised vectors.
        corpus: ``(M, d)`` L2-normalised vectors.
        k: neighbours per query: ``1 <= k <= M``, or ``k < M`` when
            ``exclude`` is given.
        exclude: optional ``(Q,)`` integer corpus index to leave out for each
            query (e.g. the query itself when queries and corpus overlap);
            ``-1`` leaves nothing out for that query. For a set against
            itself :func:`self_topk` gives the same result about twice as
            fast.
        block_size, device, dtype, memory_budget: as in :func:`self_topk`.

    Returns:
        ``(ids, sims)``: int64 corpus indices and float32 similarities, shape
        ``(Q, k)``, similarity descending, ties by smaller index first.

    Raises:
        ValueError: inputs not 2-D, empty, not finite, of different
            dimensions, ``k`` out of range, or a bad ``exclude``.
    """
    q, c, k, excl = cross_inputs(queries, corpus, k, exclude)
    m = c.shape[0]
    dev, mm_dtype = _resolve_device(device, dtype)
    block = _block_edge(block_size, q.shape[0], m, dev, mm_dtype, memory_budget)
    q_blocks = _split(_to_device(q, dev, mm_dtype), block)
    c_blocks = _split(_to_device(c, dev, mm_dtype), block)
    excl_t = None if excl is None else _torch().from_numpy(excl).to(dev)
    state = _Running(q.shape[0], k, dev)
    buffer = _Buffer(q_blocks[0].padded * c_blocks[0].padded, dev, mm_dtype)
    for row_blk in q_blocks:
        for j, col_blk in enumerate(c_blocks):
            pairs = None if excl_t is None else _excluded_pairs(excl_t, row_blk, col_blk)
            prod = buffer.product(row_blk, col_blk, exclude=pairs)
            _offer_rows(state, prod, row_blk, col_blk, seed="full" if j == 0 else None)
    return state.result()
