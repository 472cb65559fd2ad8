"""Exact results from low-precision products.

On CUDA the products default to float16 inputs: cuBLAS accumulates in float32 but rounds each similarity to
float16, about 3 significant digits, which is much faster. :func:`self_topk_exact` and :func:`cross_topk_exact`
make such a search exact: search ``k + margin`` candidates in low precision (with float32 accumulation,
:func:`fp32_accumulation`), re-score them in float32 (float64 sums) and keep k (:func:`refine`,
:func:`refine_self`). A row is certified when its k-th re-scored similarity exceeds the ``k + margin``-th
low-precision one by more than :func:`lowp_error_bound`: no row left out can then reach it. The rows that are not
certified (many near-ties) are searched again in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn import block_products
from clipaudit.knn.blocks import DEFAULT_MEMORY_BUDGET
from clipaudit.knn.cross_search import cross_topk
from clipaudit.knn.inputs import _as_exclude, _as_matrix, _check_k, _resolve_device, _torch
from clipaudit.knn.self_search import self_topk

if TYPE_CHECKING:
    import torch

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
    step = max(1, block_products._CHUNK_ENTRIES // max(1, width * c.shape[1]))
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
