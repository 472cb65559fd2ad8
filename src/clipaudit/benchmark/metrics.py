"""The benchmark's measures on unit vectors, and their bootstrap confidence intervals (pure numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def bootstrap_ci(outcomes: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of ``outcomes`` (0/1 per item), seeded (the same outcomes
    give the same interval); None for no outcomes."""
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def rate(outcomes: np.ndarray) -> dict[str, Any]:
    """``{"value": share of true outcomes, "ci95": [low, high], "n": count}`` (value and interval None when n = 0)."""
    values = np.asarray(outcomes, dtype=bool)
    ci = bootstrap_ci(values)
    return {"value": float(values.mean()) if values.size else None, "ci95": list(ci) if ci else None,
            "n": int(values.size)}


def pair_correct(image_a: np.ndarray, image_b: np.ndarray, text_a: np.ndarray, text_b: np.ndarray) -> np.ndarray:
    """MMVP's pair score per row of unit vectors: true only if image a is closer to caption a than to caption b
    and image b closer to caption b than to caption a (a tie counts as wrong)."""
    aa, ab = np.einsum("ij,ij->i", image_a, text_a), np.einsum("ij,ij->i", image_a, text_b)
    ba, bb = np.einsum("ij,ij->i", image_b, text_a), np.einsum("ij,ij->i", image_b, text_b)
    return (aa > ab) & (bb > ba)


def own_rank(image: np.ndarray, pool: np.ndarray, own: int) -> int:
    """The 1-based rank of pool row ``own`` for one unit image vector: by cosine descending, ties to the earlier
    pool position (the tcac stage's order)."""
    sims = pool @ image
    order = np.lexsort((np.arange(len(sims)), -sims))
    return int(np.flatnonzero(order == own)[0]) + 1


def separated(text_a: np.ndarray, text_b: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per row: the two unit caption vectors' cosine similarity stays below the row's threshold."""
    return np.einsum("ij,ij->i", text_a, text_b) < np.asarray(thresholds, dtype=np.float64)
