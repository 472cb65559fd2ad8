"""The neighbours stage on vectors written straight into the embedding tables: exact against brute force, ties,
the intersection of the roles, reuse on re-runs, the LanceDB ANN option and its recall, and the clear errors."""

from __future__ import annotations

import gc
import weakref

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch

from clipaudit.config import Config, NeighboursConfig
from clipaudit.io.tables import RunTables
from clipaudit.records import IMAGE_EMBEDDINGS, NEIGHBOURS, image_embeddings_schema
from clipaudit.stages import neighbours
from clipaudit.stages.neighbours import NeighboursError, run_neighbours


def write_vectors(tables: RunTables, role: str, ids: list[str], vectors: np.ndarray, spec: str = "spec") -> None:
    """Rows of one role's embedding table, as the embed stage writes them."""
    vectors = np.asarray(vectors, dtype=np.float32)
    rows = pa.table({"image_id": pa.array(ids, pa.string()), "model": pa.array([spec] * len(ids), pa.string()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})
    tables.insert_new(IMAGE_EMBEDDINGS[role], rows, "image_id", image_embeddings_schema(vectors.shape[1]))


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by cosine of every row among the others, similarity descending, ties by smaller index."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = (x.astype(np.float64) @ x.T.astype(np.float64))
    np.fill_diagonal(sims, -np.inf)
    index = np.broadcast_to(np.arange(len(x)), sims.shape)
    order = np.lexsort((index, -sims), axis=-1)[:, :k]
    return order, np.take_along_axis(sims, order, 1)


def lists(tables: RunTables, role: str) -> tuple[list[str], list[list[str]], np.ndarray]:
    table = tables.read(NEIGHBOURS, where=f"model = '{role}'").sort_by("image_id")
    return (table.column("image_id").to_pylist(), table.column("ids").to_pylist(),
            np.asarray(table.column("sims").to_pylist(), dtype=np.float32))


@pytest.fixture
def random_run(tmp_path):
    """clip embeds images 0..209, reference 10..219 (different dimensions, unnormalised): 200 in common."""
    rng = np.random.default_rng(1)
    tables = RunTables(str(tmp_path))
    ids = [f"img_{i:03d}" for i in range(220)]
    data = {"clip": rng.standard_normal((220, 24)) * rng.uniform(0.5, 3, (220, 1)),
            "reference": rng.standard_normal((220, 40))}
    write_vectors(tables, "clip", ids[:210], data["clip"][:210], "clip-spec")
    write_vectors(tables, "reference", ids[10:], data["reference"][10:], "reference-spec")
    return str(tmp_path), tables, ids[10:210], {role: v[10:210] for role, v in data.items()}


def test_exact_neighbours_match_brute_force_over_the_common_images(random_run):
    run_dir, tables, common, data = random_run
    stats = run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=7, device="cpu")), tables)
    assert stats.counts["images"] == 200
    assert stats.counts["left_out_clip"] == 10 and stats.counts["left_out_reference"] == 10
    assert "intersection" in stats.notes["population"]
    for role in ("clip", "reference"):
        image_ids, ids, sims = lists(tables, role)
        assert image_ids == common
        expected_ids, expected_sims = brute_force(data[role], 7)
        assert ids == [[common[j] for j in row] for row in expected_ids]
        np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
    table = tables.read(NEIGHBOURS)
    assert set(table.column("k").to_pylist()) == {7} and set(table.column("method").to_pylist()) == {"exact"}


def test_ties_go_to_the_smaller_image_id(tmp_path):
    tables = RunTables(str(tmp_path))
    ids = [f"img_{i:02d}" for i in range(20)]
    basis = np.eye(4, dtype=np.float32)[np.arange(20) % 4]
    write_vectors(tables, "clip", ids, basis)
    write_vectors(tables, "reference", ids, basis)
    run_neighbours(Config(run_dir=str(tmp_path), neighbours=NeighboursConfig(k=6, device="cpu")), tables)
    _, got, sims = lists(tables, "clip")
    expected, _ = brute_force(basis, 6)
    assert got == [[ids[j] for j in row] for row in expected]
    assert got[0] == ["img_04", "img_08", "img_12", "img_16", "img_01", "img_02"]
    np.testing.assert_array_equal(sims[0], [1, 1, 1, 1, 0, 0])


def test_rerun_reuses_the_table_and_a_new_k_or_image_recomputes_it(random_run):
    run_dir, tables, _, _ = random_run
    run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=5)), tables)
    version = tables.db.open_table(NEIGHBOURS).version
    again = run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=5)), tables)
    assert again.notes["reused"] is True and again.counts["rows_written"] == 0
    assert tables.db.open_table(NEIGHBOURS).version == version

    other_k = run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=4)), tables)
    assert other_k.notes["reused"] is False and tables.count(NEIGHBOURS) == 400
    assert set(tables.read(NEIGHBOURS).column("k").to_pylist()) == {4}

    rng = np.random.default_rng(5)
    write_vectors(tables, "clip", ["img_999"], rng.standard_normal((1, 24)), "clip-spec")
    write_vectors(tables, "reference", ["img_999"], rng.standard_normal((1, 40)), "reference-spec")
    grown = run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=4)), tables)
    assert grown.notes["reused"] is False and tables.count(NEIGHBOURS) == 402


@pytest.mark.parametrize(("index", "nprobes", "exhaustive"), [("IVF_FLAT", 4, True), ("IVF_HNSW_SQ", 4, True),
                                                          ("IVF_FLAT", 1, False)])
def test_ann_neighbours_and_their_measured_recall(random_run, index, nprobes, exhaustive):
    run_dir, tables, common, data = random_run
    cfg = NeighboursConfig(k=5, method="ann", ann_index=index, ann_partitions=4 if exhaustive else 16,
                           ann_nprobes=nprobes, ann_refine_factor=5 if exhaustive else 0, recall_sample=1000,
                           device="cpu")
    stats = run_neighbours(Config(run_dir=run_dir, neighbours=cfg), tables)
    for role in ("clip", "reference"):
        _, ids, sims = lists(tables, role)
        expected_ids, _ = brute_force(data[role], 5)
        found = np.mean([len(set(row) & {common[j] for j in exp}) / 5 for row, exp in zip(ids, expected_ids)])
        assert stats.notes["recall_at_k"][role] == pytest.approx(found)
        assert found >= 0.9 if exhaustive else found < 1.0
        assert all(len(row) == 5 and len(set(row)) == 5 for row in ids)
        assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert set(tables.read(NEIGHBOURS).column("method").to_pylist()) == {"ann"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_neighbours_are_fp16_close_to_brute_force(random_run):
    run_dir, tables, common, data = random_run
    stats = run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=7, device="auto")), tables)
    assert stats.notes["device"] == "cuda"
    for role in ("clip", "reference"):
        _, ids, sims = lists(tables, role)
        expected_ids, expected_sims = brute_force(data[role], 7)
        found = np.mean([len(set(row) & {common[j] for j in exp}) / 7 for row, exp in zip(ids, expected_ids)])
        assert found >= 0.97
        np.testing.assert_allclose(sims, expected_sims, atol=5e-3)


def test_k_not_below_the_image_count_is_an_error_naming_both(tmp_path):
    tables = RunTables(str(tmp_path))
    vectors = np.random.default_rng(0).standard_normal((6, 8))
    write_vectors(tables, "clip", [f"i{n}" for n in range(6)], vectors)
    write_vectors(tables, "reference", [f"i{n}" for n in range(6)], vectors)
    with pytest.raises(NeighboursError, match=r"neighbours\.k=6 must be smaller than N=6"):
        run_neighbours(Config(run_dir=str(tmp_path), neighbours=NeighboursConfig(k=6)), tables)


def test_missing_embeddings_say_run_embed_first(tmp_path):
    tables = RunTables(str(tmp_path))
    write_vectors(tables, "clip", ["a", "b", "c"], np.eye(3))
    with pytest.raises(NeighboursError, match="reference role.*run embed first"):
        run_neighbours(Config(run_dir=str(tmp_path), neighbours=NeighboursConfig(k=1)), tables)


def test_vectors_of_mismatched_dimension_are_an_error_naming_the_table(tmp_path):
    tables = RunTables(str(tmp_path))
    write_vectors(tables, "reference", ["a", "b", "c"], np.eye(3))
    rows = pa.table({"image_id": ["a", "b", "c"], "model": ["m"] * 3,
                     "vector": pa.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
                                        pa.list_(pa.float32()))})
    lance.write_dataset(rows, f"{tables.uri}/{IMAGE_EMBEDDINGS['clip']}.lance")
    with pytest.raises(NeighboursError, match=r"image_embeddings_clip holds vectors of mismatched dimensions.*'c'"):
        run_neighbours(Config(run_dir=str(tmp_path), neighbours=NeighboursConfig(k=1)), tables)


def _old_load(tables: RunTables, role: str) -> tuple[list[str], np.ndarray]:
    """The loader as it was: the whole table read, combined, then normalised into a copy."""
    table = tables.read(IMAGE_EMBEDDINGS[role], ["image_id", "vector"])
    ids = table.column("image_id").combine_chunks()
    return ids.to_pylist(), neighbours.normalise(neighbours.vector_matrix(table.column("vector"), ids, "t"))


def test_chunked_loading_equals_the_whole_table_read_bit_for_bit(tmp_path, monkeypatch):
    tables = RunTables(str(tmp_path))
    rng = np.random.default_rng(3)
    ids = [f"img_{i:03d}" for i in rng.permutation(300)]
    data = rng.standard_normal((300, 12)) * rng.uniform(0.1, 9, (300, 1))
    data[7] = 0.0
    for lo in (0, 110, 230):
        write_vectors(tables, "clip", ids[lo:lo + 120 if lo < 230 else 300], data[lo:lo + 120 if lo < 230 else 300])
    monkeypatch.setattr(neighbours, "READ_CHUNK_BYTES", 48 * 7)
    loaded = neighbours.load_vectors(tables, "clip")
    expected_ids, expected = _old_load(tables, "clip")
    assert loaded.ids.to_pylist() == expected_ids and len(expected_ids) == 300
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.flags.c_contiguous
    np.testing.assert_array_equal(loaded.vectors, expected)
    assert not loaded.vectors[expected_ids.index(ids[7])].any()


def test_restrict_copies_only_when_the_order_changes(random_run):
    _, tables, _, _ = random_run
    loaded = neighbours.load_vectors(tables, "clip")
    assert neighbours.restrict(loaded, loaded.ids) is loaded.vectors
    reordered = loaded.ids.take(pa.array(np.arange(len(loaded.ids))[::-1]))
    rows = neighbours.restrict(loaded, reordered)
    assert rows is not loaded.vectors and not np.shares_memory(rows, loaded.vectors)
    np.testing.assert_array_equal(rows, loaded.vectors[::-1])
    with pytest.raises(NeighboursError, match="lacks 1 of the images"):
        neighbours.restrict(loaded, pa.array(["img_000", "nope"]))


def test_common_ids_are_the_sorted_intersection():
    roles = {"clip": neighbours.RoleIds("clip", "a", pa.array(["b", "é", "a", "z", "B"])),
             "reference": neighbours.RoleIds("reference", "b", pa.array(["z", "B", "é", "q", "b"]))}
    assert neighbours.common_ids(roles).to_pylist() == sorted({"b", "é", "z", "B"})
    assert neighbours.common_ids(roles).type == pa.string()


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "non-finite values in the vector of 'img_105'"),
                                               (None, r"2 image\(s\) have no vector \(e.g. 'img_105'\)")])
def test_bad_vectors_name_the_first_image_across_chunks(tmp_path, monkeypatch, bad, message):
    tables = RunTables(str(tmp_path))
    vectors = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    ids = [f"img_{i:03d}" for i in range(200)]
    column = [list(v) for v in vectors]
    for row in (105, 190):
        column[row] = None if bad is None else [bad] * 4
    rows = pa.table({"image_id": ids, "model": ["m"] * 200,
                     "vector": pa.array(column, pa.list_(pa.float32(), 4))})
    lance.write_dataset(rows, f"{tables.uri}/{IMAGE_EMBEDDINGS['clip']}.lance")
    monkeypatch.setattr(neighbours, "READ_CHUNK_BYTES", 16 * 10)
    with pytest.raises(NeighboursError, match=message):
        neighbours.load_vectors(tables, "clip")


def test_the_stage_holds_one_roles_vectors_at_a_time(random_run, monkeypatch):
    run_dir, tables, _, _ = random_run
    alive: list[weakref.ref] = []
    load = neighbours.load_vectors

    def tracked(tables_: RunTables, role: str, clip_model: str | None = None) -> neighbours.RoleVectors:
        gc.collect()
        assert all(ref() is None for ref in alive), "the previous role's vectors are still held"
        loaded = load(tables_, role, clip_model)
        alive.append(weakref.ref(loaded.vectors))
        return loaded

    monkeypatch.setattr(neighbours, "load_vectors", tracked)
    run_neighbours(Config(run_dir=run_dir, neighbours=NeighboursConfig(k=5, device="cpu")), tables)
    assert len(alive) == 2
