"""The tcac stage's Arrow / CSR paths (caption pools, case ordering, summary, the streamed rewrite of
``tcac_cases``) give what the former per-row Python implementations gave, on random data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipaudit.config import TcacConfig
from clipaudit.io.tables import RunTables
from clipaudit.records import TCAC_CASES, TCAC_CASES_SCHEMA, TCAC_SUMMARY, StageStats
from clipaudit.stages.tcac import finalize
from clipaudit.tcac_scoring import build_corpus, caption_key, caption_pools, mark_cases, summarize, transform_order

WORDS = ["A", "b", "c  d", "E e", "ß", "f"]


def _reference_pools(texts: list[str], vectors: np.ndarray, captions: list[list[str]], k: int) -> list[list[int]]:
    """The former dict-and-list implementation: own rows, then each one's k nearest (ties by smaller row)."""
    index: dict[str, int] = {}
    for text in texts:
        index.setdefault(caption_key(text), len(index))
    keep = [texts.index(t) for t in dict((caption_key(t), t) for t in reversed(texts)).values()]
    unit = vectors[sorted(keep)]
    sims = unit @ unit.T
    k = min(k, len(unit) - 1)
    pools = []
    for caps in captions:
        own = list(dict.fromkeys(index[caption_key(c)] for c in caps if caption_key(c) in index))
        pool = list(own)
        for q in own:
            order = [int(i) for i in np.lexsort((np.arange(len(unit)), -sims[q])) if i != q][:max(k, 0)]
            pool.extend(i for i in order if i not in pool)
        pools.append(pool)
    return pools


@pytest.mark.parametrize("seed", range(4))
def test_csr_pools_are_the_former_pools_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_caps, n_img, k = int(rng.integers(20, 200)), int(rng.integers(1, 120)), int(rng.integers(0, 12))
    texts = [" ".join(rng.choice(WORDS, 3)) + f" {int(rng.integers(0, n_caps))}" for _ in range(n_caps)]
    vectors = rng.normal(size=(n_caps, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    captions = [[texts[j] for j in rng.integers(0, n_caps, rng.integers(0, 6))] + ["not a caption"] * (i % 5 == 0)
                for i in range(n_img)]
    corpus = build_corpus(texts, vectors)
    assert len({caption_key(t) for t in texts}) == len(corpus)
    assert corpus.texts[0] == texts[0] and all(isinstance(t, str) for t in corpus.texts)
    ids = [f"img{i}" for i in range(n_img)]
    own = corpus.rows_of(pa.array(captions, pa.list_(pa.string())))
    pools = caption_pools(corpus, own, k, image_ids=ids)
    want = _reference_pools(texts, vectors, captions, k)
    assert [pools[i].tolist() for i in ids] == want
    assert pools.offsets[-1] == len(pools.rows) == sum(map(len, want))
    from_mapping = caption_pools(corpus, {i: own.of(n).tolist() for n, i in enumerate(ids)}, k)
    assert list(from_mapping) == ids and all(np.array_equal(from_mapping[i], pools[i]) for i in ids)


def _random_cases(rng: np.random.Generator, n_img: int, transforms: list[str]) -> pa.Table:
    rows = []
    for i in rng.permutation(n_img):
        for t in transforms:
            rows.append({"image_id": f"img_{i:05d}", "transform": t, "model": "m", "params": "{}", "settings": "{}",
                         "pool_size": 12, "top_before": [f"cap {i}"] * 3, "probs_before": [0.5, 0.25, 0.25],
                         "top_after": [f"cap {i + 1}"], "probs_after": [1.0],
                         "changed": None if rng.random() < .02 else int(rng.integers(0, 4)),
                         "top1_changed": bool(rng.random() < .3), "gt_caption": f"cap {i}",
                         "gt_rank_before": None if rng.random() < .1 else int(rng.integers(1, 15)),
                         "gt_rank_after": None if rng.random() < .1 else int(rng.integers(1, 15)),
                         "gt_prob_before": 0.5, "gt_prob_after": 0.25,
                         "tv_distance": None if rng.random() < .02 else float(rng.choice([0.0, 0.5, rng.random()])),
                         "rank": 0, "is_case": False, "daf_case": False})
    return pa.Table.from_pylist(rows, schema=TCAC_CASES_SCHEMA)


def _reference_order(cases: pa.Table, configured: list[str]) -> list[int]:
    """The former Python-key sort of the cases."""
    transforms = cases.column("transform").to_pylist()
    order = {t: i for i, t in enumerate(transform_order(configured, transforms))}
    changed, tv = cases.column("changed").to_pylist(), cases.column("tv_distance").to_pylist()
    ids = cases.column("image_id").to_pylist()
    return sorted(range(cases.num_rows),
                  key=lambda i: (order[transforms[i]], -(changed[i] or 0), -(tv[i] or 0.0), ids[i]))


def test_marks_and_summary_follow_the_former_order_and_sums() -> None:
    rng = np.random.default_rng(5)
    configured = ["rotation", "hflip", "elastic", "grayscale"]
    cases = _random_cases(rng, 800, ["hflip", "rotation", "zz_old", "elastic"])
    daf = sorted({f"img_{i:05d}" for i in rng.choice(800, 100)})
    marked = mark_cases(cases, 30, pa.array(daf), configured)
    perm = _reference_order(cases, configured)
    assert marked.column("image_id").to_pylist() == [cases.column("image_id")[i].as_py() for i in perm]
    transforms = marked.column("transform").to_pylist()
    ranks = marked.column("rank").to_pylist()
    assert [r for r, t in zip(ranks, transforms) if t == "rotation"] == list(range(1, 801))
    assert transforms[:800] == ["rotation"] * 800 and transforms[-800:] == ["zz_old"] * 800
    assert marked.column("is_case").to_pylist() == [r <= 30 for r in ranks]
    assert marked.column("daf_case").to_pylist() == [i in set(daf) for i in marked.column("image_id").to_pylist()]
    summary = {r["transform"]: r for r in summarize(marked, configured).to_pylist()}
    assert list(summary) == ["rotation", "hflip", "elastic", "zz_old"]
    rows = [r for r in marked.to_pylist() if r["transform"] == "hflip"]
    tv = 0
    for r in rows:
        tv += r["tv_distance"] or 0
    assert summary["hflip"]["mean_tv_distance"] == tv / 800
    assert summary["hflip"]["mean_changed"] == sum(r["changed"] or 0 for r in rows) / 800
    assert summary["hflip"]["recall_at_5_after"] == sum(1 for r in rows if (r["gt_rank_after"] or 99) <= 5) / 800
    assert summary["hflip"]["cases"] == 30
    assert summary["hflip"]["daf_cases"] == sum(1 for r in rows if r["is_case"] and r["daf_case"])


def test_finalize_rewrites_the_table_sorted_with_every_column_kept(tmp_path) -> None:
    rng = np.random.default_rng(9)
    tables = RunTables(str(tmp_path))
    cases = _random_cases(rng, 300, ["hflip", "rotation"])
    tables.replace(TCAC_CASES, cases, TCAC_CASES_SCHEMA)
    tcac = TcacConfig(transforms=["rotation", "hflip"], cases_per_transform=7)
    stats = StageStats("tcac")
    summary = finalize(tables, tcac, stats)
    stored = tables.read(TCAC_CASES)
    perm = _reference_order(cases, tcac.transforms)
    expected = mark_cases(cases, 7, pa.array([], pa.string()), tcac.transforms)
    assert stored.equals(expected)
    assert stored.drop_columns(["rank", "is_case"]).equals(cases.take(perm).drop_columns(["rank", "is_case"]))
    assert stats.counts["cases_rewritten"] == 600 and stats.counts["total_cases"] == 14
    assert tables.read(TCAC_SUMMARY).equals(summary)
    again = StageStats("tcac")
    finalize(tables, tcac, again)
    assert "cases_rewritten" not in again.counts and tables.read(TCAC_CASES).equals(expected)
