"""Exact top-k on Ray actors (clipaudit.runtime.TopkSearch): the ids and similarities of the in-process
search, the ray_min_images threshold, the neighbours stage and the TCAC caption pools through it, actor
sizing from the nodes' resources, and a clear error when no actor can be placed. The session's local Ray
(2 CPUs); the two-node cluster is in test_knn_ray_cluster.py."""

from __future__ import annotations

import numpy as np
import pytest

from clipaudit import knn
from clipaudit.config import Config, NeighboursConfig
from clipaudit.placement import NodeShape, plan_placement
from clipaudit.runtime import TopkSearch
from clipaudit.runtime.topk import topk_request

ray = pytest.importorskip("ray")


def _normalised(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tied(n: int, seed: int) -> np.ndarray:
    """Rows from 8 vectors with entries in {0, +-0.5, 1}: exact float32 products, most of them tied."""
    pool = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [1, 0, 0, 0], [0, 1, 0, 0],
                     [0.5, 0.5, -0.5, -0.5], [0, 0, 1, 0], [-0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1]], np.float32)
    return pool[np.random.default_rng(seed).integers(0, len(pool), n)]


def _topk_placement(nodes: list[dict[str, float]], cfg: NeighboursConfig):
    shapes = [NodeShape(f"n{i}", node.get("CPU", 0.0), node.get("GPU", 0.0)) for i, node in enumerate(nodes)]
    return plan_placement(shapes, topk_request(cfg))


@pytest.mark.parametrize(
    ("nodes", "cfg", "expected"),
    [
        ([{"CPU": 2.0}], NeighboursConfig(), ("cpu", 2, 1.0, 0.0, 1)),
        ([{"CPU": 2.0}, {"CPU": 2.0}], NeighboursConfig(ray_workers=3), ("cpu", 3, 1.0, 0.0, 1)),
        ([{"CPU": 4.0}, {"CPU": 1.0}], NeighboursConfig(ray_cpus_per_worker=2.0), ("cpu", 5, 1.0, 0.0, 1)),
        ([{"CPU": 8.0}, {"CPU": 8.0}], NeighboursConfig(ray_cpus_per_worker=4.0), ("cpu", 4, 4.0, 0.0, 4)),
        ([{"CPU": 0.5}, {"CPU": 3.0}], NeighboursConfig(ray_workers=100), ("cpu", 7, 0.5, 0.0, 1)),
        ([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}], NeighboursConfig(), ("cuda", 2, 1.0, 1.0, 1)),
        ([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}], NeighboursConfig(device="cpu"), ("cpu", 10, 1.0, 0.0, 1)),
    ],
)
def test_actors_are_sized_from_each_node(nodes, cfg, expected) -> None:
    """The top-k pool through the one planner every pool uses (clipaudit.placement)."""
    p = _topk_placement(nodes, cfg)
    assert (p.device, p.actors, p.cpus_per_actor, p.gpus_per_actor, p.threads) == expected


def test_placement_errors() -> None:
    with pytest.raises(RuntimeError, match="device is cuda but no node of the cluster has a GPU"):
        _topk_placement([{"CPU": 2.0}], NeighboursConfig(device="cuda"))
    with pytest.raises(RuntimeError, match="a top-k actor needs 1 CPU on one node, and no node has that"):
        _topk_placement([{"CPU": 0.0}], NeighboursConfig())


def test_ray_search_gives_the_in_process_result(ray_local) -> None:
    """One pool for several searches: random and tie-heavy self searches with halved diagonal blocks, and a
    cross search with exclusions, identical (ids and float32 similarities) to the in-process kernel."""
    cfg = NeighboursConfig(ray_min_images=0, block_size=256)
    x = _normalised(2600, 24, 1)
    tied = _tied(900, 2)
    exclude = np.arange(500)
    exclude[::3] = -1
    with TopkSearch(cfg, lambda: None) as search:
        got = search.self_topk(x, 9)
        notes = dict(search.notes)
        got_tied = search.self_topk(tied, 12)
        got_cross = search.cross_topk(x[:500], x, 5, exclude)
        cross_notes = dict(search.notes)
    assert notes["where"] == "ray" and 1 <= notes["workers"] <= 2 and notes["units"] > 2 * 11
    assert cross_notes["where"] == "ray" and cross_notes["units"] == 2
    for (ids, sims), (ref_ids, ref_sims) in [
        (got, knn.self_topk(x, 9, block_size=256)),
        (got_tied, knn.self_topk(tied, 12, block_size=256)),
        (got_cross, knn.cross_topk(x[:500], x, 5, exclude=exclude, block_size=256)),
    ]:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(sims, ref_sims)


def test_small_searches_and_local_runner_stay_in_process(ray_local) -> None:
    x = _normalised(300, 8, 3)
    search = TopkSearch(NeighboursConfig(ray_min_images=301), lambda: pytest.fail("Ray was asked for"))
    ids, _ = search.self_topk(x, 4)
    assert search.notes["where"] == "in-process"
    np.testing.assert_array_equal(ids, knn.self_topk(x, 4)[0])
    local = TopkSearch(NeighboursConfig(ray_min_images=0), None)
    local.cross_topk(x[:10], x, 3)
    assert local.notes["where"] == "in-process"


def test_neighbours_stage_and_caption_pools_on_ray(ray_local, tmp_path) -> None:
    from test_neighbours import lists, write_vectors

    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import LazyRunner
    from clipaudit.stages.neighbours import normalise, run_neighbours
    from clipaudit.tcac_scoring import build_corpus, caption_pools

    tables = RunTables(str(tmp_path))
    ids = [f"img_{i:04d}" for i in range(700)]
    write_vectors(tables, "clip", ids, _normalised(700, 16, 4))
    write_vectors(tables, "reference", ids, _tied(700, 5))
    config = Config(run_dir=str(tmp_path), neighbours=NeighboursConfig(k=6, device="cpu", ray_min_images=500))
    stats = run_neighbours(config, tables, LazyRunner(config))
    assert {role: notes["where"] for role, notes in stats.notes["search"].items()} == {"clip": "ray",
                                                                                      "reference": "ray"}
    for role, vectors in (("clip", _normalised(700, 16, 4)), ("reference", _tied(700, 5))):
        _, found, sims = lists(tables, role)
        expected_ids, expected_sims = knn.self_topk(normalise(vectors), 6)
        assert found == [[ids[j] for j in row] for row in expected_ids]
        np.testing.assert_array_equal(sims, expected_sims)

    texts = [f"caption {i}" for i in range(600)]
    corpus = build_corpus(texts, _tied(600, 6).astype(np.float32))
    own = {f"img_{i}": [i, (i * 7) % 600] for i in range(0, 600, 5)}
    with LazyRunner(config).topk(config.neighbours) as search:
        pools = caption_pools(corpus, own, 10, topk=search.cross_topk)
        assert search.notes["where"] == "ray"
    expected = caption_pools(corpus, own, 10)
    assert pools.keys() == expected.keys()
    for image_id, pool in expected.items():
        np.testing.assert_array_equal(pools[image_id], pool)


def test_unplaceable_actors_fail_fast_with_what_they_ask(ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipaudit.runtime.topk as topk

    monkeypatch.setattr(topk, "TOPK_START_TIMEOUT_S", 2.0)
    holder = ray.remote(num_cpus=2)(type("Holder", (), {"ping": lambda self: None})).remote()
    ray.get(holder.ping.remote())
    try:
        with pytest.raises(RuntimeError, match=r"no top-k actor started within 2 s: each asks for 1 CPU"):
            TopkSearch(NeighboursConfig(ray_min_images=0), lambda: None).self_topk(_normalised(200, 8, 7), 3)
    finally:
        ray.kill(holder)
