"""Tests for the exact cosine k-NN core (clipaudit.knn)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clipaudit import knn
from clipaudit.knn import cross_topk, self_topk, self_topk_work


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(
    queries: np.ndarray, corpus: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: sort each row by (-similarity, index)."""
    sims = queries.astype(np.float64) @ corpus.astype(np.float64).T
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        sims[rows, exclude[rows]] = -np.inf
    index = np.arange(corpus.shape[0])
    ids = np.stack([np.lexsort((index, -row))[:k] for row in sims])
    return ids, np.take_along_axis(sims, ids, axis=1)


def _assert_matches(
    ids: np.ndarray,
    sims: np.ndarray,
    queries: np.ndarray,
    corpus: np.ndarray,
    ref_ids: np.ndarray,
    ref_sims: np.ndarray,
) -> None:
    """Same ids as the reference, except where float32 rounding may reorder
    near-equal similarities; there the true similarity of our id must equal
    the reference's at that rank."""
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert ids.shape == ref_ids.shape and sims.shape == ref_ids.shape
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    rows, cols = np.nonzero(ids != ref_ids)
    true = np.einsum("ij,ij->i", queries[rows].astype(np.float64), corpus[ids[rows, cols]].astype(np.float64))
    np.testing.assert_allclose(true, ref_sims[rows, cols], atol=1e-5)
    for row in ids:
        assert len(set(row.tolist())) == ids.shape[1]


def _tie_heavy(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    """Rows drawn from the 16 unit vectors with entries +-0.5 on 4 fixed axes,
    plus one-hot vectors: every inner product is exact in float32 and most
    are tied (many rows are exact duplicates)."""
    signs = np.array(list(itertools.product([-0.5, 0.5], repeat=4)), dtype=np.float32)
    pool = np.zeros((16 + d, d), dtype=np.float32)
    pool[:16, :4] = signs
    pool[16:] = np.eye(d, dtype=np.float32)
    return pool[rng.integers(0, len(pool), size=n)]


@pytest.mark.parametrize(
    ("n", "d", "k", "block_size"),
    [(40, 8, 5, None), (300, 16, 10, 64), (1000, 32, 7, 128), (700, 4, 20, 64), (1500, 64, 1, None)],
)
def test_self_topk_matches_brute_force(n: int, d: int, k: int, block_size: int | None) -> None:
    x = _normalised(np.random.default_rng(n + d + k), n, d)
    ids, sims = self_topk(x, k, block_size=block_size)
    ref_ids, ref_sims = _reference(x, x, k, exclude=np.arange(n))
    _assert_matches(ids, sims, x, x, ref_ids, ref_sims)
    assert not (ids == np.arange(n)[:, None]).any()


def test_duplicates_are_neighbours_of_each_other() -> None:
    rng = np.random.default_rng(1)
    x = _normalised(rng, 600, 24)
    src = rng.choice(300, size=50, replace=False)
    dst = 300 + rng.choice(300, size=50, replace=False)
    x[dst] = x[src]
    ids, sims = self_topk(x, 5, block_size=64)
    assert (ids[src, 0] == dst).all() and (ids[dst, 0] == src).all()
    np.testing.assert_allclose(sims[src, 0], 1.0, atol=1e-6)
    ref_ids, ref_sims = _reference(x, x, 5, exclude=np.arange(len(x)))
    _assert_matches(ids, sims, x, x, ref_ids, ref_sims)


@pytest.mark.parametrize(("n", "k", "block_size"), [(200, 5, 64), (500, 12, 128), (500, 40, None)])
def test_exact_ties_break_by_smaller_index(n: int, k: int, block_size: int | None) -> None:
    x = _tie_heavy(np.random.default_rng(n + k), n)
    ids, sims = self_topk(x, k, block_size=block_size)
    ref_ids, ref_sims = _reference(x, x, k, exclude=np.arange(n))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims.astype(np.float32))


def test_tie_order_does_not_depend_on_blocking() -> None:
    x = _tie_heavy(np.random.default_rng(7), 777)
    results = [self_topk(x, 9, block_size=b) for b in (64, 192, 1024)]
    for ids, sims in results[1:]:
        np.testing.assert_array_equal(ids, results[0][0])
        np.testing.assert_array_equal(sims, results[0][1])


def test_all_rows_identical() -> None:
    x = np.tile(_normalised(np.random.default_rng(3), 1, 16), (130, 1))
    ids, sims = self_topk(x, 4, block_size=64)
    expected = np.array([[j for j in range(5) if j != i][:4] for i in range(130)])
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_small_chunks_buckets_and_split_diagonal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the rarely taken paths: chunked candidate gathering, merges of
    rows with very different candidate counts, halved diagonal blocks."""
    monkeypatch.setattr(knn.block_products, "_CHUNK_ENTRIES", 4096)
    monkeypatch.setattr(knn.running_topk, "_NARROW", 2)
    monkeypatch.setattr(knn.blocks, "_MIN_SPLIT", 64)
    rng = np.random.default_rng(11)
    x = np.concatenate([_tie_heavy(rng, 300), np.zeros((300, 8), np.float32)], axis=0)
    x[300:, 4:] = _normalised(rng, 300, 4)
    x = x[rng.permutation(len(x))]
    ids, sims = self_topk(x, 15, block_size=256)
    ref_ids, ref_sims = _reference(x, x, 15, exclude=np.arange(len(x)))
    _assert_matches(ids, sims, x, x, ref_ids, ref_sims)
    tied = np.ptp(ref_sims, axis=1) == 0
    np.testing.assert_array_equal(ids[tied], ref_ids[tied])


def test_cross_topk_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    queries, corpus = _normalised(rng, 150, 32), _normalised(rng, 900, 32)
    ids, sims = cross_topk(queries, corpus, 8, block_size=128)
    _assert_matches(ids, sims, queries, corpus, *_reference(queries, corpus, 8))


def test_cross_topk_with_exclusion() -> None:
    rng = np.random.default_rng(6)
    corpus = _normalised(rng, 500, 16)
    queries = corpus[:200]
    exclude = np.arange(200)
    exclude[::7] = -1
    ids, sims = cross_topk(queries, corpus, 6, exclude=exclude, block_size=64)
    _assert_matches(ids, sims, queries, corpus, *_reference(queries, corpus, 6, exclude))
    assert not (ids[exclude >= 0] == exclude[exclude >= 0, None]).any()
    assert (ids[::7, 0] == np.arange(200)[::7]).all()


def test_cross_topk_equals_self_topk_with_self_excluded() -> None:
    x = _tie_heavy(np.random.default_rng(9), 400)
    np.testing.assert_array_equal(
        cross_topk(x, x, 7, exclude=np.arange(400), block_size=128)[0],
        self_topk(x, 7, block_size=128)[0],
    )


def test_cross_topk_whole_corpus() -> None:
    rng = np.random.default_rng(8)
    queries, corpus = _normalised(rng, 10, 8), _normalised(rng, 30, 8)
    ids, _ = cross_topk(queries, corpus, 30)
    assert (np.sort(ids, axis=1) == np.arange(30)).all()


def test_self_topk_work_is_about_half_the_matrix() -> None:
    assert self_topk_work(100, block_size=64) == 64 * 64 + 64 * 64 + 64 * 64
    for n in (20_000, 100_000):
        assert 0.5 < self_topk_work(n) / n**2 < 0.55


def test_keys_order_by_value_then_index() -> None:
    torch = pytest.importorskip("torch")
    vals = torch.tensor([[0.5, -0.0, 0.0, -0.25, -1.0, float("-inf"), 0.5]])
    ids = torch.tensor([[3, 1, 2, 0, 4, 5, 1]])
    order = torch.argsort(knn._keys(vals, ids), dim=1, descending=True)
    assert ids[0, order[0]].tolist() == [1, 3, 1, 2, 0, 4, 5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: self_topk(x, 5), "k=5 must be smaller than N=5"),
        (lambda x: self_topk(x, 0), "k=0 must be at least 1"),
        (lambda x: self_topk(x[0], 2), "must be a 2-D array"),
        (lambda x: self_topk(x[None], 2), "must be a 2-D array"),
        (lambda x: cross_topk(x, x[:, :3], 2), "queries have d=4 but corpus has d=3"),
        (lambda x: cross_topk(x, x, 6), "k=6 must be at most the corpus size M=5"),
        (lambda x: cross_topk(x, x, 5, exclude=np.arange(5)), "k=5 must be smaller than M=5"),
        (lambda x: cross_topk(x, x, 2, exclude=np.arange(4)), "exclude must have shape (5,)"),
        (lambda x: cross_topk(x, x, 2, exclude=np.full(5, 5)), "exclude values must be -1"),
        (lambda x: self_topk(x, 2, block_size=0), "block_size must be a positive integer"),
    ],
)
def test_errors(call, message: str) -> None:
    x = _normalised(np.random.default_rng(0), 5, 4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x)


def test_nan_is_rejected() -> None:
    x = _normalised(np.random.default_rng(0), 6, 4)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 1 row\\(s\\), first row 3"):
        self_topk(x, 2)


def _coverage(n: int, pairs: list[knn.Pair]) -> np.ndarray:
    count = np.zeros((n, n), dtype=np.int64)
    for (r0, r1), (c0, c1) in pairs:
        count[r0:r1, c0:c1] += 1
        if (r0, r1) != (c0, c1):
            count[c0:c1, r0:r1] += 1
    return count


def test_self_pairs_offer_every_entry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn.blocks, "_MIN_SPLIT", 64)
    for n, block in ((300, 64), (1000, 256), (777, 512)):
        pairs = knn.self_pairs(n, block)
        assert (_coverage(n, pairs) == 1).all()
        assert any(rows != cols and rows[1] > cols[0] for rows, cols in pairs) is False


@pytest.mark.parametrize("data", ["gaussian", "ties"])
def test_shares_of_the_pairs_merge_to_self_topk(monkeypatch: pytest.MonkeyPatch, data: str) -> None:
    """Pairs dealt to three searches in a scrambled order (so off-diagonal blocks come first and are seeded
    from their run maxima) merge to exactly the in-process result."""
    monkeypatch.setattr(knn.blocks, "_MIN_SPLIT", 64)
    rng = np.random.default_rng(21)
    x = _normalised(rng, 900, 24) if data == "gaussian" else _tie_heavy(rng, 900)
    k, block = 8, 192
    pairs = knn.self_pairs(len(x), block)
    order = rng.permutation(len(pairs))
    shares = [[pairs[i] for i in order[w::3]] for w in range(3)]
    merged = None
    for share in shares:
        search = knn.SelfSearch(x, k, block)
        search.run(share)
        merged = search.result() if merged is None else knn.merge_topk(merged, search.result())
    ids, sims = self_topk(x, k, block_size=block)
    np.testing.assert_array_equal(merged[0], ids)
    np.testing.assert_array_equal(merged[1], sims)


def test_merge_topk_orders_by_similarity_then_smaller_id() -> None:
    a = (np.array([[4, 9, knn._SENTINEL_ID]]), np.array([[0.5, 0.25, -np.inf]], dtype=np.float32))
    b = (np.array([[2, 7, 1]]), np.array([[0.5, 0.75, 0.25]], dtype=np.float32))
    ids, sims = knn.merge_topk(a, b)
    assert ids.tolist() == [[7, 2, 4]]
    assert sims.tolist() == [[0.75, 0.5, 0.5]]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_low_precision_search_is_made_exact(dtype_name: str) -> None:
    """Forced low-precision products on CPU, re-scored in float32: the float32 ids, and rows without a clear
    gap are searched again."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    x = _normalised(np.random.default_rng(31), 800, 32)
    expected_ids, expected_sims = self_topk(x, 6, block_size=128)
    ids, sims, again = knn.self_topk_exact(x, 6, margin=6, dtype=dtype, block_size=128)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(sims, expected_sims, atol=2e-6)
    lowp_ids, _ = self_topk(x, 6, block_size=128, dtype=dtype)
    assert (lowp_ids != expected_ids).any()
    _, _, again_narrow = knn.self_topk_exact(x, 6, margin=0, dtype=dtype, block_size=128)
    assert again < again_narrow <= len(x)


def test_low_precision_ties_fall_back_to_float32() -> None:
    torch = pytest.importorskip("torch")
    x = _tie_heavy(np.random.default_rng(32), 500)
    ids, sims, again = knn.self_topk_exact(x, 9, margin=4, dtype=torch.bfloat16, block_size=128)
    ref_ids, ref_sims = _reference(x, x, 9, exclude=np.arange(len(x)))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims.astype(np.float32))
    assert again > 0


def test_cross_topk_exact_with_exclusion() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(33)
    corpus = _normalised(rng, 600, 16)
    exclude = np.arange(150)
    exclude[::5] = -1
    ids, sims, _ = knn.cross_topk_exact(corpus[:150], corpus, 7, margin=5, exclude=exclude, dtype=torch.float16)
    expected = cross_topk(corpus[:150], corpus, 7, exclude=exclude)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_allclose(sims, expected[1], atol=2e-6)


def test_refine_searches_uncertified_rows_again() -> None:
    """refine trusts the candidate lists only as far as the error bound proves them complete: with a bound
    wider than the gap every row is searched again (and these lists, missing each row's best neighbour, are
    corrected); with a gap wider than the bound the re-scored candidates are kept as they are."""
    rng = np.random.default_rng(34)
    x = _normalised(rng, 200, 8)
    true_ids, true_sims = cross_topk(x[:3], x, 4, exclude=np.arange(3))
    wrong, lowp = true_ids[:, 1:].copy(), true_sims[:, 1:].copy()
    ids, sims, again = knn.refine(x[:3], x, wrong, lowp, 2, 1.0, exclude=np.arange(3))
    assert again == 3
    np.testing.assert_array_equal(ids, true_ids[:, :2])
    np.testing.assert_array_equal(sims, true_sims[:, :2])
    lowp[:, -1] = -1.0
    ids, _, again = knn.refine(x[:3], x, wrong, lowp, 2, 1e-3, exclude=np.arange(3))
    assert again == 0
    np.testing.assert_array_equal(ids, true_ids[:, 1:3])


def test_lowp_error_bound_grows_with_the_roundoff() -> None:
    torch = pytest.importorskip("torch")
    f32 = knn.lowp_error_bound(torch.float32, 512)
    f16 = knn.lowp_error_bound(torch.float16, 512)
    bf16 = knn.lowp_error_bound(torch.bfloat16, 512)
    assert f32 < 1e-4 < f16 < bf16 < 0.02
    assert knn.lowp_error_bound(torch.float16, 512, max_norm=2.0) == pytest.approx(4 * f16)


def test_self_tasks_hold_every_pair_once_diagonals_first() -> None:
    n, block = 5000, 512
    tasks = knn.self_tasks(n, block, workers=2, per_worker=4)
    flat = [pair for task in tasks for pair in task]
    assert sorted(flat) == sorted(knn.self_pairs(n, block))
    n_spans = len(knn.row_spans(n, block))
    assert all(rows[0] < cols[1] and rows[1] > cols[0] or rows == cols for task in tasks[:n_spans]
               for rows, cols in task)
    assert all(rows[1] <= cols[0] for task in tasks[n_spans:] for rows, cols in task)
    assert len(tasks) - n_spans <= 2 * 4 + n_spans


def test_low_precision_shares_merge_and_refine_to_float32() -> None:
    """What a GPU pool does: shares of the pairs searched for k + margin in low precision, merged, re-scored."""
    torch = pytest.importorskip("torch")
    x = _normalised(np.random.default_rng(35), 700, 16)
    k, wide, block = 5, 9, 128
    pairs = knn.self_pairs(len(x), block)
    merged = None
    for share in (pairs[1::2], pairs[::2]):
        search = knn.SelfSearch(x, wide, block, dtype=torch.bfloat16)
        search.run(share)
        merged = search.result() if merged is None else knn.merge_topk(merged, search.result())
    ids, sims, again = knn.refine_self(x, merged[0], merged[1], k, torch.bfloat16)
    expected_ids, expected_sims = self_topk(x, k, block_size=block)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(sims, expected_sims, atol=2e-6)
    assert 0 < again < len(x)


def test_exact_searches_accumulate_low_precision_products_in_fp32_and_restore_the_setting() -> None:
    """The error bound of the fp16 path assumes fp32 accumulation; PyTorch's default on CUDA reduces in fp16."""
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = True
    try:
        with knn.fp32_accumulation():
            assert not matmul.allow_fp16_reduced_precision_reduction and not matmul.allow_tf32
        assert matmul.allow_fp16_reduced_precision_reduction, "restored after"
    finally:
        matmul.allow_fp16_reduced_precision_reduction = before
