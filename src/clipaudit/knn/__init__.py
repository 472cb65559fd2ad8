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

The package, bottom up (each module imports only modules listed above it):

* :mod:`~clipaudit.knn.inputs`: checked inputs; torch imported on first use.
* :mod:`~clipaudit.knn.blocks`: block edges, row spans, padded blocks, the block products of a self search.
* :mod:`~clipaudit.knn.running_topk`: the running top-k of every row, its order keys, :func:`merge_topk`.
* :mod:`~clipaudit.knn.block_products`: one block product and the threshold filter that reduces it.
* :mod:`~clipaudit.knn.self_search`: :func:`self_topk` and :class:`SelfSearch`, the symmetric search.
* :mod:`~clipaudit.knn.cross_search`: :func:`cross_topk`, queries against a corpus.
* :mod:`~clipaudit.knn.lowp_exact`: exact results from float16 / bfloat16 products.
"""

from clipaudit.knn.block_products import COL_TILE
from clipaudit.knn.blocks import (
    DEFAULT_MEMORY_BUDGET,
    TILE,
    Pair,
    Span,
    auto_block_size,
    cross_block_edge,
    pair_work,
    row_spans,
    self_block_edge,
    self_pairs,
    self_tasks,
    self_topk_work,
)
from clipaudit.knn.cross_search import cross_topk
from clipaudit.knn.inputs import cross_inputs, self_inputs
from clipaudit.knn.lowp_exact import (
    ExactTopk,
    cross_topk_exact,
    fp32_accumulation,
    lowp_error_bound,
    refine,
    refine_self,
    self_topk_exact,
)
from clipaudit.knn.running_topk import _SENTINEL_ID as _SENTINEL_ID
from clipaudit.knn.running_topk import _keys as _keys
from clipaudit.knn.running_topk import merge_topk
from clipaudit.knn.self_search import SelfSearch, self_topk

__all__ = [
    "TILE",
    "COL_TILE",
    "DEFAULT_MEMORY_BUDGET",
    "ExactTopk",
    "Pair",
    "SelfSearch",
    "Span",
    "auto_block_size",
    "cross_block_edge",
    "cross_inputs",
    "cross_topk",
    "cross_topk_exact",
    "fp32_accumulation",
    "lowp_error_bound",
    "merge_topk",
    "pair_work",
    "refine",
    "refine_self",
    "row_spans",
    "self_block_edge",
    "self_inputs",
    "self_pairs",
    "self_tasks",
    "self_topk",
    "self_topk_exact",
    "self_topk_work",
]
