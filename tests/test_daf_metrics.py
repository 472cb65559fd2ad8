"""The DAF metrics on hand-made neighbour lists."""

from __future__ import annotations

import numpy as np
import pytest

from clipaudit import daf_metrics as dm


def test_overlap_counts_shared_neighbours_regardless_of_order():
    a = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    b = np.array([[3, 2, 1], [4, 5, 6], [9, 1, 8]])
    np.testing.assert_array_equal(dm.overlap_counts(a, b), [3, 0, 1])
    np.testing.assert_allclose(dm.overlap_at_k(a, b), [1.0, 0.0, 1 / 3])


def test_prefix_overlaps_count_items_in_both_prefixes():
    np.testing.assert_array_equal(dm.prefix_overlaps(np.array([[1, 2, 3, 4]]), np.array([[2, 1, 5, 4]])),
                                  [[0, 2, 2, 3]])


@pytest.mark.parametrize("mode", ["extrapolated", "truncated"])
def test_rbo_is_one_for_identical_and_zero_for_disjoint_lists(mode):
    a = np.array([[1, 2, 3, 4, 5]])
    assert dm.rbo(a, a, 0.9, mode)[0] == pytest.approx(1.0)
    assert dm.rbo(a, a + 10, 0.9, mode)[0] == 0.0
    assert 0 < dm.rbo(a, a[:, ::-1], 0.9, mode)[0] < 1


@pytest.mark.parametrize("mode", ["extrapolated", "truncated"])
def test_rbo_weighs_agreement_at_the_top_more(mode):
    a = np.array([[1, 2, 3, 4, 5, 6]])
    top = np.array([[1, 2, 3, 10, 11, 12]])
    bottom = np.array([[10, 11, 12, 4, 5, 6]])
    assert dm.rbo(a, top, 0.8, mode)[0] > dm.rbo(a, bottom, 0.8, mode)[0]
    assert dm.overlap_counts(a, top)[0] == dm.overlap_counts(a, bottom)[0]


def test_rbo_by_hand():
    a, b = np.array([[1, 2]]), np.array([[2, 3]])
    assert dm.rbo(a, b, 0.5, "extrapolated")[0] == pytest.approx(0.5 * 0.25 + 1.0 * (0 + 0.5 * 0.25))
    assert dm.rbo(a, b, 0.5, "truncated")[0] == pytest.approx(0.5 * (0.5 * 0.5) / 0.75)


def test_rbo_rejects_a_bad_persistence_and_mismatched_lists():
    a = np.array([[1, 2]])
    with pytest.raises(ValueError, match="p must be in"):
        dm.rbo(a, a, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        dm.rbo(a, np.array([[1, 2, 3]]))


def _random_lists(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    others = [np.delete(np.arange(n), i) for i in range(n)]
    return np.stack([rng.permutation(row)[:k] for row in others])


def test_chance_levels_match_unrelated_lists():
    rng = np.random.default_rng(0)
    n, k = 60, 6
    draws = [(_random_lists(n, k, rng), _random_lists(n, k, rng)) for _ in range(40)]
    mean_overlap = np.mean([dm.overlap_at_k(a, b).mean() for a, b in draws])
    mean_rbo = np.mean([dm.rbo(a, b).mean() for a, b in draws])
    assert dm.chance_overlap(k, n) == pytest.approx(k / (n - 1))
    assert mean_overlap == pytest.approx(dm.chance_overlap(k, n), rel=0.1)
    assert mean_rbo == pytest.approx(dm.chance_rbo(k, n), rel=0.1)
    with pytest.raises(ValueError, match="k=5 must be at least 1 and smaller than N=5"):
        dm.chance_overlap(5, 5)


def test_permutation_null_is_seeded_and_sits_at_chance():
    rng = np.random.default_rng(1)
    n, k = 200, 5
    a = _random_lists(n, k, rng)
    null = dm.permutation_null(a, a, permutations=50, seed=3)
    again = dm.permutation_null(a, a, permutations=50, seed=3)
    np.testing.assert_array_equal(null.counts, again.counts)
    assert not np.array_equal(null.counts, dm.permutation_null(a, a, permutations=50, seed=4).counts)
    assert null.pairs == pytest.approx(50 * n, rel=0.05)
    assert null.mean_overlap.mean() == pytest.approx(dm.chance_overlap(k, n), rel=0.25)
    p, z = null.corpus_test(1.0)
    assert p == pytest.approx(1 / 51) and z > 10
    sampled = dm.permutation_null(a, a, permutations=5, seed=0, sample=20)
    assert sampled.sample == 20 and sampled.pairs <= 100


def test_null_p_values_fall_with_agreement():
    null = dm.NullDistribution(k=3, permutations=1, sample=10, counts=np.array([90, 8, 2, 0]))
    p = dm.null_p_values(np.array([0, 1, 2, 3]), null)
    np.testing.assert_allclose(p, [101 / 101, 11 / 101, 3 / 101, 1 / 101])
    assert np.isnan(dm.null_p_values(np.array([1]), dm.NullDistribution(3, 0, 0, np.zeros(4, int)))).all()


def test_z_scores():
    np.testing.assert_allclose(dm.z_scores(np.array([0.0, 1.0])), [-1.0, 1.0])
    np.testing.assert_array_equal(dm.z_scores(np.array([0.5, 0.5])), [0.0, 0.0])


def test_select_cases_by_threshold_and_top_n_in_divergence_order():
    score = np.array([0.2, 0.9, 0.9, 0.5, 1.0])
    counts = np.array([4, 1, 0, 2, 0])
    selected, rank = dm.select_cases(score, counts, k=5, max_overlap=0.2)
    np.testing.assert_array_equal(selected, [4, 2, 1])
    np.testing.assert_array_equal(rank, [5, 3, 2, 4, 1])
    np.testing.assert_array_equal(dm.select_cases(score, counts, 5, top_n=2)[0], [4, 2])
    np.testing.assert_array_equal(dm.select_cases(score, counts, 5, max_overlap=0.4, top_n=10)[0], [4, 2, 1, 3])
    np.testing.assert_array_equal(dm.select_cases(score, counts, 5, max_overlap=0.0)[0], [4, 2])


def test_exclusive_keeps_each_lists_order():
    a_only, b_only = dm.exclusive(np.array([5, 1, 7, 3]), np.array([3, 9, 5, 8]))
    np.testing.assert_array_equal(a_only, [1, 7])
    np.testing.assert_array_equal(b_only, [9, 8])


def test_neighbour_pairs_are_unordered_and_deduplicated():
    ids = np.array([[1, 2], [0, 2], [1, 0]])
    sims = np.array([[0.9, 0.5], [0.9, 0.7], [0.7, 0.5]], dtype=np.float32)
    lo, hi, sim = dm.neighbour_pairs(ids, sims)
    assert list(zip(lo.tolist(), hi.tolist())) == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(sim, [0.9, 0.5, 0.7])


def test_pair_cosines_are_exact_inner_products():
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(dm.pair_cosines(x, np.array([0, 1, 0]), np.array([1, 2, 2]), chunk=2),
                               [0.6, 0.8, 0.0])


def test_blind_pair_mask_absolute_and_quantile():
    clip = np.array([0.99, 0.97, 0.90, 0.96, 0.50])
    reference = np.array([0.30, 0.70, 0.20, 0.55, 0.10])
    mask, used = dm.blind_pair_mask(clip, reference, "absolute", clip_min=0.95, reference_max=0.6)
    np.testing.assert_array_equal(mask, [True, False, False, True, False])
    assert (used.clip_min, used.reference_max) == (0.95, 0.6)
    mask, used = dm.blind_pair_mask(clip, reference, "quantile", clip_quantile=0.5, reference_quantile=0.5)
    assert used.rule == "quantile" and used.clip_min == pytest.approx(0.96) and used.reference_max == 0.3
    np.testing.assert_array_equal(mask, [True, False, False, False, False])
    with pytest.raises(ValueError, match="absolute"):
        dm.blind_pair_mask(clip, reference, "both")
