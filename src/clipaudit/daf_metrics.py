"""The DAF's metrics over two models' top-k neighbour lists (numpy only, no I/O).

Neighbour lists are ``(N, k)`` integer arrays: row ``i`` holds the indices of image ``i``'s top-k neighbours in
rank order, without repeats and without ``i`` itself. ``a`` is CLIP's, ``b`` the reference's.

* :func:`overlap_counts` / :func:`overlap_at_k`: ``|A_i & B_i|`` and that over ``k`` (mutual-kNN agreement).
* :func:`rbo`: rank-biased overlap (Webber, Moffat and Zobel 2010) at persistence ``p``, either extrapolated
  (``RBO_ext``, their eq. 32 for two lists of equal length k: ``X_k/k p^k + (1-p)/p sum_d X_d/d p^d``) or
  truncated at depth k and divided by its maximum ``1 - p^k``; both give 1 for identical and 0 for disjoint lists.
* :func:`chance_overlap` / :func:`chance_rbo`: the expected values for two unrelated top-k lists of a corpus of
  N images (each a random k-subset of the N-1 others): ``E|A & B| = k^2/(N-1)``, so overlap@k ``k/(N-1)``; RBO
  is linear in the prefix agreements, whose expectation is ``d/(N-1)`` at depth d.
* :func:`permutation_null`: the same, measured: the reference lists are shuffled across images (seeded) and the
  overlaps of CLIP list ``i`` with reference list ``pi(i)`` pooled; :func:`null_p_values` turns the pooled
  distribution into per-image p-values, :meth:`NullDistribution.corpus_test` tests the corpus's mean overlap.
* :func:`select_cases`: the divergence order and the failure cases (an overlap threshold and/or the top N).
* :func:`neighbour_pairs`, :func:`pair_cosines`, :func:`blind_pair_mask`: CLIP-blind pairs (MMVP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

RboMode = Literal["extrapolated", "truncated"]
_CHUNK_ENTRIES = 1 << 24


def _check_lists(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"neighbour lists must be two (N, k) arrays of one shape; got {a.shape} and {b.shape}")
    if a.shape[1] == 0:
        raise ValueError("neighbour lists must hold at least one neighbour (k >= 1)")
    return a, b


def depth_matches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, k)`` counts: entry ``[i, t]`` is how many shared items enter both prefixes first at depth ``t + 1``.

    An item at position ``r`` of ``a_i`` and ``s`` of ``b_i`` is in both prefixes from depth ``max(r, s) + 1``.
    """
    a, b = _check_lists(a, b)
    n, k = a.shape
    depth = np.maximum.outer(np.arange(k), np.arange(k)).ravel()
    onehot = np.zeros((k * k, k), dtype=np.int64)
    onehot[np.arange(k * k), depth] = 1
    out = np.empty((n, k), dtype=np.int64)
    step = max(1, _CHUNK_ENTRIES // (k * k))
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        match = a[lo:hi, :, None] == b[lo:hi, None, :]
        out[lo:hi] = match.reshape(hi - lo, k * k).astype(np.int64) @ onehot
    return out


def prefix_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, k)``: entry ``[i, d - 1]`` is ``X_d = |a_i[:d] & b_i[:d]|``."""
    return np.cumsum(depth_matches(a, b), axis=1)


def overlap_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N,)`` int: how many neighbours the two lists of each row share."""
    return depth_matches(a, b).sum(axis=1)


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N,)`` float: the shared fraction ``|a_i & b_i| / k`` of each row's two top-k lists."""
    return overlap_counts(a, b) / np.asarray(a).shape[1]


def rbo_from_agreement(agreement: np.ndarray, p: float, mode: RboMode = "extrapolated") -> np.ndarray:
    """RBO from the prefix agreements ``A_d = X_d / d`` (shape ``(..., k)``), see the module docstring."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"rbo persistence p must be in (0, 1); got {p}")
    agreement = np.asarray(agreement, dtype=np.float64)
    k = agreement.shape[-1]
    depth = np.arange(1, k + 1)
    if mode == "extrapolated":
        return agreement[..., -1] * p**k + (1.0 - p) / p * (agreement * p**depth).sum(axis=-1)
    if mode == "truncated":
        return (1.0 - p) * (agreement * p ** (depth - 1)).sum(axis=-1) / (1.0 - p**k)
    raise ValueError(f"rbo mode must be 'extrapolated' or 'truncated'; got {mode!r}")


def rbo(a: np.ndarray, b: np.ndarray, p: float = 0.9, mode: RboMode = "extrapolated") -> np.ndarray:
    """``(N,)`` rank-biased overlap of each row's two lists: 1 identical, 0 disjoint, top ranks weigh more."""
    a, b = _check_lists(a, b)
    return rbo_from_agreement(prefix_overlaps(a, b) / np.arange(1, a.shape[1] + 1), p, mode)


def chance_overlap(k: int, n: int) -> float:
    """Expected overlap@k of two unrelated top-k lists drawn from the ``n - 1`` other images: ``k / (n - 1)``."""
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be at least 1 and smaller than N={n}")
    return k / (n - 1)


def chance_rbo(k: int, n: int, p: float = 0.9, mode: RboMode = "extrapolated") -> float:
    """Expected RBO of two unrelated top-k lists of a corpus of ``n`` images (exact: RBO is linear in ``A_d``)."""
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be at least 1 and smaller than N={n}")
    return float(rbo_from_agreement(np.arange(1, k + 1) / (n - 1), p, mode))


@dataclass
class NullDistribution:
    """The permutation null: what overlap unrelated lists of this corpus reach.

    ``counts`` is the pooled histogram of shared-neighbour counts (index c: pairs sharing c), over every
    permutation and sampled image; ``mean_overlap`` / ``mean_rbo`` hold each permutation's mean.
    """

    k: int
    permutations: int
    sample: int
    counts: np.ndarray
    mean_overlap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean_rbo: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def pairs(self) -> int:
        """How many (image, shuffled reference list) pairs the histogram pools."""
        return int(self.counts.sum())

    def corpus_test(self, observed_mean_overlap: float) -> tuple[float, float]:
        """``(p, z)`` of the corpus's mean overlap@k against the permutation means.

        ``p = (1 + #{null mean >= observed}) / (1 + permutations)``: small when the two models agree beyond
        chance; ``z`` the observed mean in null standard deviations (inf when the null has no spread).
        """
        if self.permutations == 0:
            return float("nan"), float("nan")
        null = self.mean_overlap
        p = (1 + int(np.sum(null >= observed_mean_overlap - 1e-12))) / (1 + len(null))
        spread = float(null.std())
        z = (observed_mean_overlap - float(null.mean())) / spread if spread > 0 else float("inf")
        return p, z


def permutation_null(a: np.ndarray, b: np.ndarray, permutations: int, seed: int = 0, sample: int | None = None,
                     p: float = 0.9, mode: RboMode = "extrapolated") -> NullDistribution:
    """Shuffle the reference lists' identities across images and measure the overlaps that result.

    Each permutation draws ``pi`` over all N images and pairs ``a[i]`` with ``b[pi(i)]`` for ``sample`` images
    (all when None or larger than N; a seeded sample otherwise); fixed points ``pi(i) = i`` are left out.
    """
    a, b = _check_lists(a, b)
    n, k = a.shape
    rng = np.random.default_rng(seed)
    size = n if sample is None else min(int(sample), n)
    counts = np.zeros(k + 1, dtype=np.int64)
    means, rbo_means = [], []
    for _ in range(int(permutations)):
        rows = np.arange(n) if size == n else rng.choice(n, size=size, replace=False)
        partner = rng.permutation(n)[rows]
        keep = partner != rows
        rows, partner = rows[keep], partner[keep]
        if rows.size == 0:
            continue
        prefix = prefix_overlaps(a[rows], b[partner])
        counts += np.bincount(prefix[:, -1], minlength=k + 1)
        means.append(prefix[:, -1].mean() / k)
        rbo_means.append(rbo_from_agreement(prefix / np.arange(1, k + 1), p, mode).mean())
    return NullDistribution(k, len(means), size, counts, np.asarray(means, dtype=np.float64),
                            np.asarray(rbo_means, dtype=np.float64))


def null_p_values(counts: np.ndarray, null: NullDistribution) -> np.ndarray:
    """Per image: the chance that unrelated lists share at least as many neighbours, ``(1 + #>=) / (1 + pairs)``.

    Small: the two models agree on this image beyond chance; near 1: its two neighbourhoods are as unrelated
    as those of two random images. NaN when the null is empty.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if null.pairs == 0:
        return np.full(counts.shape, np.nan)
    at_least = np.cumsum(null.counts[::-1])[::-1]
    return (1.0 + at_least[np.clip(counts, 0, null.k)]) / (1.0 + null.pairs)


def z_scores(values: np.ndarray) -> np.ndarray:
    """Standard scores over the corpus (zeros when every value is the same)."""
    values = np.asarray(values, dtype=np.float64)
    spread = values.std()
    return np.zeros_like(values) if spread == 0 else (values - values.mean()) / spread


def divergence_order(score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row indices most divergent first: score descending, then fewer shared neighbours, then row index."""
    score = np.asarray(score, dtype=np.float64)
    return np.lexsort((np.arange(len(score)), np.asarray(counts), -score))


def select_cases(score: np.ndarray, counts: np.ndarray, k: int, max_overlap: float | None = None,
                 top_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(selected, rank)``: the failure cases in divergence order, and every row's 1-based divergence rank.

    A row is a case when ``counts / k <= max_overlap`` (when given); of those, at most the first ``top_n``
    (when given) are kept. With neither given every row is a case.
    """
    counts = np.asarray(counts)
    order = divergence_order(score, counts)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    selected = order
    if max_overlap is not None:
        limit = int(np.floor(max_overlap * k + 1e-9))
        selected = selected[counts[selected] <= limit]
    if top_n is not None:
        selected = selected[:top_n]
    return selected, rank


def exclusive(a_row: np.ndarray, b_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a_only, b_only)``: the items of one list missing from the other, each in its own list's order."""
    a_row, b_row = np.asarray(a_row), np.asarray(b_row)
    return a_row[~np.isin(a_row, b_row)], b_row[~np.isin(b_row, a_row)]


def neighbour_pairs(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unordered, deduplicated pairs ``(lo, hi, sim)`` of (image, neighbour), ``lo < hi``.

    A pair listed from both sides keeps the larger similarity (the same up to rounding). Sorted by ``(lo, hi)``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float32)
    if ids.shape != sims.shape or ids.ndim != 2:
        raise ValueError(f"ids and sims must be (N, k) arrays of one shape; got {ids.shape} and {sims.shape}")
    n = ids.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), ids.shape[1])
    cols = ids.ravel()
    keep = cols != rows
    rows, cols, vals = rows[keep], cols[keep], sims.ravel()[keep]
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    key = lo * max(n, int(hi.max(initial=0)) + 1) + hi
    order = np.lexsort((-vals, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    pick = order[first]
    return lo[pick], hi[pick], vals[pick]


def pair_cosines(vectors: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """``(P,)`` float32 inner products of rows ``a[j]`` and ``b[j]`` of L2-normalised ``vectors`` (exact, fp32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    out = np.empty(len(a), dtype=np.float32)
    for lo in range(0, len(a), chunk):
        hi = lo + chunk
        out[lo:hi] = np.einsum("ij,ij->i", vectors[a[lo:hi]], vectors[b[lo:hi]])
    return out


@dataclass(frozen=True)
class BlindThresholds:
    """The thresholds a CLIP-blind pair meets: ``clip_sim >= clip_min`` and ``reference_sim <= reference_max``."""

    rule: str
    clip_min: float
    reference_max: float


def blind_pair_mask(clip_sim: np.ndarray, reference_sim: np.ndarray, rule: str = "absolute",
                    clip_min: float = 0.95, reference_max: float = 0.6, clip_quantile: float = 0.9,
                    reference_quantile: float = 0.1) -> tuple[np.ndarray, BlindThresholds]:
    """Which pairs are CLIP-blind: near-identical to CLIP, different to the reference.

    ``absolute``: ``clip_sim >= clip_min`` and ``reference_sim <= reference_max``. ``quantile``: the thresholds
    are the ``clip_quantile`` quantile of ``clip_sim`` and the ``reference_quantile`` quantile of
    ``reference_sim`` over the given pairs (absolute values depend on the models; quantiles do not).
    """
    clip_sim = np.asarray(clip_sim, dtype=np.float64)
    reference_sim = np.asarray(reference_sim, dtype=np.float64)
    if rule == "quantile":
        if clip_sim.size == 0:
            return np.zeros(0, dtype=bool), BlindThresholds(rule, float("nan"), float("nan"))
        clip_min = float(np.quantile(clip_sim, clip_quantile))
        reference_max = float(np.quantile(reference_sim, reference_quantile))
    elif rule != "absolute":
        raise ValueError(f"blind pair rule must be 'absolute' or 'quantile'; got {rule!r}")
    mask = (clip_sim >= clip_min) & (reference_sim <= reference_max)
    return mask, BlindThresholds(rule, float(clip_min), float(reference_max))
