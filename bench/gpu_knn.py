"""bench/gpu.py's knn section: the project's exact self and cross top-k against a bare matmul + topk."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from gpu_measure import _best_rounds, _peak_memory_mb, _ratio, _release, _reset_peak, _sync

if TYPE_CHECKING:
    from gpu import Sizes

KNN_MARGIN = 10


def _unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _bare_topk(queries: np.ndarray, corpus: np.ndarray, k: int, device: str, dtype: Any,
               self_search: bool) -> np.ndarray:
    """Ids of the top-k of each query row by ``torch.mm`` + ``torch.topk`` over blocks of rows (the row itself
    left out when ``self_search``); the similarity block held at most about 1 GiB (CUDA) or 256 MiB (CPU)."""
    import torch

    with torch.inference_mode():
        c = torch.from_numpy(corpus).to(device=device, dtype=dtype)
        q = c if self_search else torch.from_numpy(queries).to(device=device, dtype=dtype)
        budget = 2**30 if device.startswith("cuda") else 2**28
        rows = max(1, budget // (c.shape[0] * c.element_size()))
        ids = torch.empty((q.shape[0], k), dtype=torch.int64, device=device)
        for start in range(0, q.shape[0], rows):
            block = q[start:start + rows] @ c.T
            if self_search:
                local = torch.arange(block.shape[0], device=device)
                block[local, local + start] = -math.inf
            ids[start:start + rows] = torch.topk(block, k, dim=1).indices
        return ids.cpu().numpy()


def _id_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each row's ids in ``a`` that are also in the row of ``b``."""
    return float((a[:, :, None] == b[:, None, :]).any(axis=2).mean())


def knn_section(device: str, sizes: Sizes) -> dict[str, Any]:
    """Exact self and cross top-k of the project against a bare matmul + topk, in the dtype of the products."""
    import torch

    from clipaudit import knn

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    k, n, d = sizes.k, sizes.knn_n, sizes.knn_dim
    corpus = _unit_vectors(n, d, seed=0)
    queries = _unit_vectors(sizes.knn_queries, d, seed=1)
    wide = min(n - 1, k + KNN_MARGIN)
    saved = None
    if device.startswith("cuda"):
        saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    _reset_peak(device)
    try:
        warm = corpus[:min(n, 2048)]
        knn.self_topk_exact(warm, k, margin=KNN_MARGIN, device=device)
        knn.cross_topk_exact(queries[:256], warm, k, margin=KNN_MARGIN, device=device)
        _bare_topk(warm, warm, k, device, dtype, True)
        _bare_topk(queries[:256], warm, k, device, dtype, False)
        out: dict[str, Any] = {}

        def self_project() -> None:
            out["self_project"] = knn.self_topk_exact(corpus, k, margin=KNN_MARGIN, device=device)

        def self_bare() -> None:
            out["self_bare"] = _bare_topk(corpus, corpus, k, device, dtype, True)

        def cross_project() -> None:
            out["cross_project"] = knn.cross_topk_exact(queries, corpus, k, margin=KNN_MARGIN, device=device)

        def cross_bare() -> None:
            out["cross_bare"] = _bare_topk(queries, corpus, k, device, dtype, False)

        seconds = _best_rounds({"self_project": self_project, "self_bare": self_bare,
                                "cross_project": cross_project, "cross_bare": cross_bare}, device, sizes.repeats)
        _sync(device)
        start = time.perf_counter()
        cand, lowp = knn.self_topk(corpus, wide, device=device)
        _sync(device)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        knn.refine_self(corpus, cand, lowp, k, dtype, exact=lambda q, c, kk, excl: knn.cross_topk(
            q, c, kk, exclude=excl, device=device, dtype=torch.float32))
        refine_s = time.perf_counter() - start
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = saved
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "k": k, "margin": KNN_MARGIN, "dim": d,
                              "peak_device_mb": _peak_memory_mb(device)}
    for kind, queries_n in (("self", n), ("cross", sizes.knn_queries)):
        project_rate = queries_n / seconds[f"{kind}_project"]
        bare_rate = queries_n / seconds[f"{kind}_bare"]
        result[kind] = {
            "queries": queries_n, "corpus": n, "project_queries_per_s": project_rate,
            "bare_queries_per_s": bare_rate, "ratio": _ratio(project_rate, bare_rate),
            "searched_again": int(out[f"{kind}_project"][2]),
            "id_overlap_project_vs_bare": _id_overlap(out[f"{kind}_project"][0], out[f"{kind}_bare"]),
        }
    result["self"]["refine_share"] = refine_s / (search_s + refine_s)
    _release(device)
    return result

