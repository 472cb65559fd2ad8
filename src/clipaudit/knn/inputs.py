"""Checked inputs of the exact searches, and torch imported on first use.

Every search takes ``(N, d)`` arrays that are numeric, non-empty and finite, converted once to C-contiguous
float32 (:func:`_as_matrix`); a ``k`` within the rows a row may have (:func:`_check_k`); for a cross search an
optional corpus index to leave out per query (:func:`_as_exclude`); and a device and dtype for the products
(:func:`_resolve_device`: float32 on CPU, float16 by default on CUDA). :func:`self_inputs` and
:func:`cross_inputs` run the checks of :func:`~clipaudit.knn.self_topk` and :func:`~clipaudit.knn.cross_topk`,
so that a caller that hands the work out fails as they would before anything starts.

torch is imported on first use (:func:`_torch`), so importing the package stays light.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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


def _to_device(x: np.ndarray, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _torch().from_numpy(x).to(device=dev, dtype=dtype)
