"""Exact cosine k-nearest neighbours by blocked matrix products.

For L2-normalised vectors the cosine similarity is the inner product, so the
neighbours of every row come from ``X @ X.T``. That matrix is never held
whole: it is computed one ``block x block`` tile at a time and reduced to the
running top-k of every row, so memory is O(block^2 + N * k) on top of the
input.

Three things make it fast on a CPU without giving up exactness:

* **Symmetry.** In :func:`self_topk` the tile ``X_I @ X_J.T`` (I < J) serves
  both the rows of block I and, read down its columns, the rows of block J,
  so only the upper triangle of block pairs is multiplied: about half the
  flops of a one-sided search such as faiss ``IndexFlatIP``.
* **Threshold filtering.** Each row keeps its current k-th best similarity.
  A tile entry below it can never enter the result, so each tile is reduced
  to maxima over runs of :data:`TILE` entries (a cheap vectorised pass), and
  only runs whose maximum reaches the threshold are looked at entry by entry.
  The full ``torch.topk`` over a tile is needed only to seed the thresholds.
* **One thread pool.** The matrix products (``torch.mm``, MKL or cuBLAS) and
  the reductions run in torch, with ``torch.get_num_threads()`` threads.

Exactness and order: candidates are merged by a single int64 key built from
the similarity's order-preserving bit pattern and the column index, so the
result is sorted by similarity descending with ties broken by the smaller
index, independently of how ``torch.topk`` orders equal values. Entries equal
to a threshold always survive the filter, so ties at the k-th place are
resolved by index too. On CPU the products are exact float32. On CUDA they
default to float16 inputs (cuBLAS accumulates in float32 but rounds each
similarity to float16, about 3 significant digits), which is much faster;
pass ``dtype=torch.float32`` for float32 results there. The ordering is then
exact with respect to the similarities that were computed.

Exact results from low-precision products (:func:`self_topk_exact`,
:func:`cross_topk_exact`, :func:`refine`): search ``k + margin`` candidates
in float16, re-score them in float32 (float64 sums) and keep k. A row is
certified when its k-th re-scored similarity exceeds the ``k + margin``-th
low-precision one by more than :func:`lowp_error_bound`: no row left out can
then reach it. The rows that are not certified (many near-ties) are searched
again in float32.

Distributed self search: :func:`self_pairs` lists the block products, any
share of them runs through a :class:`SelfSearch`, and :func:`merge_topk`
combines the partial results (each entry is offered by exactly one share).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "TILE",
    "DEFAULT_MEMORY_BUDGET",
    "Pair",
    "SelfSearch",
    "Span",
    "auto_block_size",
    "cross_topk",
    "cross_topk_exact",
    "lowp_error_bound",
    "merge_topk",
    "pair_work",
    "refine",
    "refine_self",
    "row_spans",
    "self_block_edge",
    "self_pairs",
    "self_topk",
    "self_topk_exact",
    "self_topk_work",
]

TILE = 64
"""Length of the row runs whose maxima pre-filter a block; blocks are padded to it."""

COL_TILE = 16
"""Length of the column runs (a divisor of TILE): gathering a column run is strided."""

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes allowed for one similarity block when ``block_size`` is not given."""

_MAX_BLOCK = {"cpu": 4096, "cuda": 16384}
_MIN_BLOCKS = 6
_MIN_SPLIT = 1024
_SENTINEL_ID = 2**31 - 1
_LOW_BITS = 2**32 - 1
_NARROW = 64
_CHUNK_ENTRIES = 2**22


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


def self_inputs(vectors: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The checked inputs of :func:`self_topk`: float32 C-contiguous vectors and k (ValueError as there)."""
    x = _as_matrix(vectors, "vectors")
    n = x.shape[0]
    return x, _check_k(k, n - 1, f"k={k} must be smaller than N={n}: each row excludes itself")


def cross_inputs(
    queries: np.ndarray, corpus: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """The checked inputs of :func:`cross_topk`: ``(queries, corpus, k, exclude)`` (ValueError as there)."""
    q = _as_matrix(queries, "queries")
    c = _as_matrix(corpus, "corpus")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries have d={q.shape[1]} but corpus has d={c.shape[1]}")
    m = c.shape[0]
    excl = _as_exclude(exclude, q.shape[0], m)
    if excl is None:
        k = _check_k(k, m, f"k={k} must be at most the corpus size M={m}")
    else:
        k = _check_k(k, m - 1, f"k={k} must be smaller than M={m} when an index is excluded")
    return q, c, k, excl


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


def self_topk_work(n: int, *, block_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Number of similarities :func:`self_topk` computes for ``n`` rows on CPU
    (padding included): about ``n**2 / 2``, against ``n**2`` for a one-sided
    search. Its matmul flops are ``2 * d`` times this."""
    block = self_block_edge(n, block_size=block_size, memory_budget=memory_budget)
    return sum(pair_work(pair) for pair in self_pairs(n, block))


Span = tuple[int, int]
"""Rows ``start:stop`` of the matrix."""

Pair = tuple[Span, Span]
"""One block product of a self search: ``(rows, cols)``; ``rows == cols`` is a diagonal block."""


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


def merge_topk(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of two partial results ``(ids, sims)`` of the same rows: similarity descending, ties by
    smaller id; ``k`` defaults to the width of ``a``. The two must not both hold the same (row, id)."""
    torch = _torch()
    ids = torch.from_numpy(np.concatenate([a[0], b[0]], axis=1).astype(np.int64, copy=False))
    vals = torch.from_numpy(np.concatenate([a[1], b[1]], axis=1).astype(np.float32, copy=False))
    width = a[0].shape[1] if k is None else k
    order = torch.topk(_keys(vals, ids), width, dim=1).indices
    return ids.gather(1, order).numpy(), vals.gather(1, order).numpy()


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


ExactTopk = Callable[[np.ndarray, np.ndarray, int, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
"""``(queries, corpus, k, exclude) -> (ids, sims)``: an exact float32 search (:func:`cross_topk` by default)."""

_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}


def lowp_error_bound(dtype: torch.dtype, dim: int, max_norm: float = 1.0) -> float:
    """A bound on ``|low-precision product - exact inner product|`` for rows of norm at most ``max_norm``:
    both inputs rounded to ``dtype`` (``2u``), the result rounded to it (``u``), ``dim`` float32
    accumulations, and the float32 rounding of the re-scored value. Assumes float32 accumulation (on CUDA,
    set ``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False``)."""
    u = _UNIT_ROUNDOFF[str(dtype).removeprefix("torch.")]
    scale = max_norm * max_norm
    return scale * (3 * u + u * u + (dim + 2) * 2.0**-24)


def refine(
    queries: np.ndarray,
    corpus: np.ndarray,
    candidates: np.ndarray,
    lowp_sims: np.ndarray,
    k: int,
    eps: float,
    *,
    exclude: np.ndarray | None = None,
    exact: ExactTopk | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact top-k from a low-precision top-``k + margin`` (``candidates``, ``lowp_sims``, best first).

    Each candidate is re-scored (float64 sums of the float32 vectors, rounded to float32) and the best k are
    kept, ties by smaller id. A row is certified when its ``k + margin``-th low-precision similarity plus
    ``eps`` (:func:`lowp_error_bound`) is below its k-th re-scored one, or when its candidates are all the
    corpus rows it may have; the other rows go through ``exact`` (default :func:`cross_topk` on CPU) with
    their ``exclude`` entry.

    Returns:
        ``(ids, sims, searched_again)``: ``(Q, k)`` int64 and float32, and how many rows were not certified.
    """
    q = _as_matrix(queries, "queries")
    c = _as_matrix(corpus, "corpus")
    n_rows, width = candidates.shape
    available = c.shape[0] - (0 if exclude is None else 1)
    ids = np.empty((n_rows, k), dtype=np.int64)
    sims = np.empty((n_rows, k), dtype=np.float32)
    certified = np.empty(n_rows, dtype=bool)
    step = max(1, _CHUNK_ENTRIES // max(1, width * c.shape[1]))
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        cand = candidates[lo:hi]
        valid = (cand >= 0) & (cand < c.shape[0]) & np.isfinite(lowp_sims[lo:hi])
        safe = np.where(valid, cand, 0)
        exact_sims = np.einsum("qd,qld->ql", q[lo:hi].astype(np.float64), c[safe].astype(np.float64))
        exact_sims = np.where(valid, exact_sims.astype(np.float32), -np.inf).astype(np.float32)
        keyed = np.where(valid, cand, np.iinfo(np.int64).max)
        order = np.lexsort((keyed, -exact_sims), axis=-1)[:, :k]
        ids[lo:hi] = np.take_along_axis(keyed, order, 1)
        sims[lo:hi] = np.take_along_axis(exact_sims, order, 1)
        last = lowp_sims[lo:hi, -1].astype(np.float64)
        complete = valid.sum(axis=1) >= available
        certified[lo:hi] = complete | (last + eps < sims[lo:hi, -1])
    again = np.flatnonzero(~certified)
    if again.size:
        run = exact or _float32_on(_torch().device("cpu"))
        ids[again], sims[again] = run(q[again], c, k, None if exclude is None else exclude[again])
    return ids, sims, int(again.size)


def self_topk_exact(
    vectors: np.ndarray,
    k: int,
    *,
    margin: int,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`self_topk` with low-precision products made exact: ``k + margin`` candidates, then
    :func:`refine` (uncertified rows searched in float32 on the same device). Returns ``(ids, sims,
    searched_again)``; the ids and order are those of a float32 search up to float32 rounding of the sums."""
    x = _as_matrix(vectors, "vectors")
    n = x.shape[0]
    _check_k(k, n - 1, f"k={k} must be smaller than N={n}: each row excludes itself")
    wide = min(n - 1, k + _check_margin(margin))
    dev, mm_dtype = _resolve_device(device, dtype)
    with fp32_accumulation():
        cand, lowp = self_topk(x, wide, block_size=block_size, device=dev, dtype=mm_dtype,
                               memory_budget=memory_budget)
    return refine_self(x, cand, lowp, k, mm_dtype, exact=_float32_on(dev))


def refine_self(
    vectors: np.ndarray,
    candidates: np.ndarray,
    lowp_sims: np.ndarray,
    k: int,
    dtype: torch.dtype,
    *,
    exact: ExactTopk | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`refine` for a self search whose ``dtype`` products gave ``candidates`` (e.g. merged from
    :class:`SelfSearch` shares): each row's own index excluded, the error bound from the rows' largest norm."""
    x = _as_matrix(vectors, "vectors")
    eps = lowp_error_bound(dtype, x.shape[1], _max_norm(x))
    return refine(x, x, candidates, lowp_sims, k, eps, exclude=np.arange(x.shape[0]), exact=exact)


def cross_topk_exact(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    margin: int,
    exclude: np.ndarray | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`cross_topk` with low-precision products made exact (see :func:`self_topk_exact`)."""
    q = _as_matrix(queries, "queries")
    c = _as_matrix(corpus, "corpus")
    m = c.shape[0] - (0 if exclude is None else 1)
    wide = max(k, min(m, k + _check_margin(margin)))
    dev, mm_dtype = _resolve_device(device, dtype)
    with fp32_accumulation():
        cand, lowp = cross_topk(q, c, wide, exclude=exclude, block_size=block_size, device=dev, dtype=mm_dtype,
                                memory_budget=memory_budget)
    excl = _as_exclude(exclude, q.shape[0], c.shape[0])
    eps = lowp_error_bound(mm_dtype, q.shape[1], max(_max_norm(q), _max_norm(c)))
    return refine(q, c, cand, lowp, k, eps, exclude=excl, exact=_float32_on(dev))


@contextmanager
def fp32_accumulation() -> Iterator[None]:
    """CUDA matmuls of float16 / bfloat16 inputs accumulate in float32 (and float32 ones skip TF32) for the
    duration, as :func:`lowp_error_bound` assumes; the settings are restored after. (PyTorch's default lets fp16
    matmuls reduce in fp16, which would break the bound on a GPU.)"""
    matmul = _torch().backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction", "allow_tf32")
    saved = {name: getattr(matmul, name) for name in names}
    for name in names:
        setattr(matmul, name, False)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


def _check_margin(margin: int) -> int:
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be a non-negative integer; got {margin!r}")
    return int(margin)


def _max_norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64).max()))


def _float32_on(dev: torch.device) -> ExactTopk:
    """An exact float32 :func:`cross_topk` on ``dev``."""

    def run(queries: np.ndarray, corpus: np.ndarray, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, ...]:
        return cross_topk(queries, corpus, k, exclude=exclude, device=dev, dtype=_torch().float32)

    return run


def _torch() -> ModuleType:
    """The torch module, imported on first use to keep this module light."""
    import torch

    return torch


def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as a C-contiguous finite float32 ``(N, d)`` array, or ValueError."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and column; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # A float64 sum of float32 values cannot overflow, so it is finite
    # exactly when the row is: one pass, no N x d temporary.
    row_sums = arr.sum(axis=1, dtype=np.float64)
    if not np.isfinite(row_sums).all():
        bad = np.flatnonzero(~np.isfinite(row_sums))
        raise ValueError(f"{name} contains NaN or infinite values in {bad.size} row(s), first row {bad[0]}")
    return arr


def _check_k(k: int, max_k: int, message: str) -> int:
    """``k`` as an int in ``[1, max_k]``, or ValueError with ``message``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer; got {k!r}")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if k > max_k:
        raise ValueError(message)
    return int(k)


def _as_exclude(exclude: np.ndarray | None, n_queries: int, n_corpus: int) -> np.ndarray | None:
    """``exclude`` as int64 ``(Q,)`` with values in ``[-1, M)``, or ValueError."""
    if exclude is None:
        return None
    excl = np.asarray(exclude)
    if excl.shape != (n_queries,):
        raise ValueError(f"exclude must have shape ({n_queries},), one index per query; got {excl.shape}")
    if not np.issubdtype(excl.dtype, np.integer):
        raise ValueError(f"exclude must hold integer indices; got dtype {excl.dtype}")
    excl = excl.astype(np.int64)
    bad = (excl < -1) | (excl >= n_corpus)
    if bad.any():
        raise ValueError(
            f"exclude values must be -1 (none) or in [0, {n_corpus}); "
            f"got {excl[bad][0]} for query {np.flatnonzero(bad)[0]}"
        )
    return excl


def _resolve_device(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The torch device and the dtype of the products on it."""
    torch = _torch()
    dev = torch.device("cpu" if device is None else device)
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if dtype is None:
        return dev, torch.float32 if dev.type == "cpu" else torch.float16
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {allowed} on {dev.type}; got {dtype}")
    return dev, dtype


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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, multiple: int) -> int:
    return _ceil_div(a, multiple) * multiple


def _to_device(x: np.ndarray, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _torch().from_numpy(x).to(device=dev, dtype=dtype)


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


class _Product:
    """A similarity block with the maxima of its row runs and column runs."""

    def __init__(self, s: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor | None) -> None:
        self.s = s
        self.row_max = row_max
        self.col_max = col_max


class _Buffer:
    """Reused storage for a similarity block and its run maxima."""

    def __init__(self, size: int, dev: torch.device, dtype: torch.dtype) -> None:
        """Room for ``size`` similarities (the largest block: the first row block by the first column block)."""
        torch = _torch()
        self.flat = torch.empty(size, device=dev, dtype=dtype)
        self.row_flat = torch.empty(size // TILE, device=dev, dtype=dtype)
        self.col_flat = torch.empty(size // COL_TILE, device=dev, dtype=dtype)

    def product(
        self,
        rows: _Block,
        cols: _Block,
        *,
        diagonal: bool = False,
        exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
        col_runs: bool = False,
    ) -> _Product:
        """``rows @ cols.T`` and its run maxima, with -inf at padding, on the
        diagonal if asked, and at the ``exclude`` (row, column) pairs."""
        torch = _torch()
        b, c = rows.padded, cols.padded
        s = self.flat[: b * c].view(b, c)
        torch.mm(rows.data, cols.data.t(), out=s)
        if cols.size < c:
            s[:, cols.size :] = -math.inf
        if rows.size < b:
            s[rows.size :] = -math.inf
        if diagonal:
            s.diagonal().fill_(-math.inf)
        if exclude is not None:
            s[exclude] = -math.inf
        row_max = self.row_flat[: b * c // TILE].view(b, c // TILE)
        torch.amax(s.view(b, c // TILE, TILE), dim=2, out=row_max)
        col_max = None
        if col_runs:
            col_max = self.col_flat[: b * c // COL_TILE].view(b // COL_TILE, c)
            torch.amax(s.view(b // COL_TILE, COL_TILE, c), dim=1, out=col_max)
        return _Product(s, row_max, col_max)


class _Running:
    """Running top-k (similarity, index) of every row, sorted by :func:`_keys`."""

    def __init__(self, n: int, k: int, dev: torch.device) -> None:
        torch = _torch()
        self.k = k
        self.vals = torch.full((n, k), -math.inf, dtype=torch.float32, device=dev)
        self.ids = torch.full((n, k), _SENTINEL_ID, dtype=torch.int64, device=dev)

    def bar(self, blk: _Block) -> _Bar:
        """The k-th (similarity, index) of the block's rows; padding rows get
        +inf so that they take no candidates."""
        torch = _torch()
        dev = self.vals.device
        thr = torch.full((blk.padded,), math.inf, dtype=torch.float32, device=dev)
        kth = torch.full((blk.padded,), _SENTINEL_ID, dtype=torch.int64, device=dev)
        thr[: blk.size] = self.vals[blk.start : blk.stop, self.k - 1]
        kth[: blk.size] = self.ids[blk.start : blk.stop, self.k - 1]
        return _Bar(thr, kth)

    def merge(self, rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor) -> None:
        """Merge candidates ``(rows[j], ids[j], vals[j])``: global row indices
        in ascending order, global ids, similarities.

        Rows are padded to the widest row's candidate count before one top-k,
        so rows are grouped by count (up to ``_NARROW``, then powers of two) to
        keep the padding below twice the candidates.
        """
        if rows.numel() == 0:
            return
        torch = _torch()
        urows, counts = torch.unique_consecutive(rows, return_counts=True)
        if int(counts.max()) <= _NARROW:
            self._merge_padded(urows, counts, rows, ids, vals)
            return
        group = torch.where(counts <= _NARROW, 0, torch.ceil(torch.log2(counts.double())).long())
        entry_group = torch.repeat_interleave(group, counts)
        for g in torch.unique(group).tolist():
            keep = entry_group == g
            sel = group == g
            self._merge_padded(urows[sel], counts[sel], rows[keep], ids[keep], vals[keep])

    def _merge_padded(
        self, urows: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor
    ) -> None:
        """Merge the candidates of rows ``urows`` (``counts`` each, in ``rows``
        order) with one top-k over the running entries and the candidates."""
        torch = _torch()
        k = self.k
        dev = rows.device
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.repeat_interleave(torch.arange(urows.numel(), device=dev), counts)
        pos = torch.arange(rows.numel(), device=dev) - starts[slot] + k
        width = k + int(counts.max())
        cand_v = torch.full((urows.numel(), width), -math.inf, dtype=torch.float32, device=dev)
        cand_i = torch.full((urows.numel(), width), _SENTINEL_ID, dtype=torch.int64, device=dev)
        cand_v[:, :k] = self.vals[urows]
        cand_i[:, :k] = self.ids[urows]
        cand_v[slot, pos] = vals.to(torch.float32)
        cand_i[slot, pos] = ids
        order = torch.topk(_keys(cand_v, cand_i), k, dim=1).indices
        self.vals[urows] = cand_v.gather(1, order)
        self.ids[urows] = cand_i.gather(1, order)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sims)`` as numpy arrays on the host."""
        return self.ids.cpu().numpy(), self.vals.cpu().numpy()


class _Bar:
    """Per-row entry bar: a candidate ``(v, id)`` can still enter a row's
    top-k only if ``v > thr`` or ``v == thr and id < kth``."""

    def __init__(self, thr: torch.Tensor, kth: torch.Tensor) -> None:
        self.thr = thr
        self.kth = kth

    def raise_to(self, thr: torch.Tensor) -> None:
        """Raise the bar to at least ``thr`` (ties at a raised bar all pass)."""
        torch = _torch()
        raised = thr > self.thr
        self.thr = torch.where(raised, thr, self.thr)
        self.kth = torch.where(raised, _SENTINEL_ID, self.kth)

    def screen(self, vals: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(h, j)`` in ``vals`` (runs of row ``owner[h]``) that
        reach the bar's similarity; the index test is left to :meth:`admit`."""
        return (vals >= self.thr[owner, None]).nonzero(as_tuple=True)

    def admit(self, vals: torch.Tensor, ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Mask of finite screened candidates that clear the bar of ``owner``."""
        thr = self.thr[owner]
        return ((vals > thr) | (ids < self.kth[owner])) & (vals > -math.inf)


def _keys(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (similarity descending, index ascending) as descending.

    The high 32 bits are the float32 bit pattern made monotone in the value
    (negative floats have their magnitude bits flipped; ``+ 0.0`` folds -0.0
    onto 0.0), the low 32 bits are ``2**32 - 1 - index``.
    """
    torch = _torch()
    bits = (vals + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (_LOW_BITS - ids)


def _seed_thresholds(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of ``s`` (-inf if it has fewer than k)."""
    torch = _torch()
    if k > s.shape[1]:
        return torch.full((s.shape[0],), -math.inf, dtype=torch.float32, device=s.device)
    return torch.topk(s, k, dim=1, sorted=False).values.amin(dim=1).to(torch.float32)


def _runs_kth(run_max: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest run maximum along ``dim`` (-inf if there are fewer than k runs): k distinct entries of
    the row (or column) reach it, so it is a lower bound of the row's k-th similarity."""
    torch = _torch()
    if k > run_max.shape[dim]:
        other = run_max.shape[1 - dim]
        return torch.full((other,), -math.inf, dtype=torch.float32, device=run_max.device)
    return torch.topk(run_max, k, dim=dim, sorted=False).values.amin(dim=dim).to(torch.float32)


def _offer_rows(state: _Running, prod: _Product, rows: _Block, cols: _Block, *, seed: str | None = None) -> None:
    """Merge the entries of the block that can enter their row's top-k.

    ``seed``: ``full`` raises the rows' bars to their k-th similarity in this block, ``runs`` to the k-th
    largest maximum of their runs (cheaper, a little lower); None leaves them as they are.
    Runs whose maximum reaches the row's bar are gathered, in chunks of rows
    holding at most ``_CHUNK_ENTRIES`` run entries, and checked entry by entry.
    """
    bar = state.bar(rows)
    if seed == "full":
        bar.raise_to(_seed_thresholds(prod.s, state.k))
    elif seed == "runs":
        bar.raise_to(_runs_kth(prod.row_max, state.k, dim=1))
    b, c = prod.s.shape
    runs = prod.s.view(b, c // TILE, TILE)
    hit = prod.row_max >= bar.thr[:, None]
    for lo, hi in _chunks(hit.sum(dim=1), _CHUNK_ENTRIES // TILE):
        r, t = hit[lo:hi].nonzero(as_tuple=True)
        r += lo
        runs_hit = runs[r, t]
        h, j = bar.screen(runs_hit, r)
        _admit(state, bar, r[h], t[h] * TILE + j + cols.start, runs_hit[h, j], rows.start)


def _offer_cols(state: _Running, prod: _Product, rows: _Block, cols: _Block, *, seed: bool = False) -> None:
    """Merge the entries of the block that can enter their column's top-k (``seed``: first raise the columns'
    bars to the k-th largest maximum of their runs)."""
    bar = state.bar(cols)
    if seed:
        bar.raise_to(_runs_kth(prod.col_max, state.k, dim=0))
    b, c = prod.s.shape
    runs = prod.s.view(b // COL_TILE, COL_TILE, c)
    hit = prod.col_max >= bar.thr[None, :]
    for lo, hi in _chunks(hit.sum(dim=0), _CHUNK_ENTRIES // COL_TILE):
        col, t = hit[:, lo:hi].t().nonzero(as_tuple=True)
        col += lo
        runs_hit = runs[t, :, col]
        h, j = bar.screen(runs_hit, col)
        _admit(state, bar, col[h], t[h] * COL_TILE + j + rows.start, runs_hit[h, j], cols.start)


def _admit(state: _Running, bar: _Bar, owner: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, base: int) -> None:
    """Merge the screened candidates of block-local rows ``owner`` that clear the bar."""
    keep = bar.admit(vals, ids, owner)
    state.merge(owner[keep] + base, ids[keep], vals[keep])


def _chunks(hits: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """Split ``range(len(hits))`` into consecutive spans of at most ``limit``
    total hits (a single index may exceed it)."""
    total = int(hits.sum())
    n = hits.numel()
    if total <= limit:
        return [(0, n)]
    ends = _torch().cumsum(hits, 0).cpu().numpy()
    spans, lo = [], 0
    while lo < n:
        base = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, base + limit, side="right")), lo + 1)
        spans.append((lo, hi))
        lo = hi
    return spans


def _excluded_pairs(excl: torch.Tensor, rows: _Block, cols: _Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-local (row, column) of the excluded indices that fall in ``cols``."""
    local = excl[rows.start : rows.stop]
    r = ((local >= cols.start) & (local < cols.stop)).nonzero().squeeze(1)
    return r, local[r] - cols.start
