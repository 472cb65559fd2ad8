"""The tcac stage end to end on generated scenes with plug-in models that are flip-invariant (or not) by
construction: pools against brute force, seeded reproducibility, resume, reuse of stored vectors, Ray."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from clipaudit.config import Config, EmbedConfig, ModelsConfig, TcacConfig
from clipaudit.io.tables import RunTables
from clipaudit.models import resolve_model
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    REJECTS,
    SAMPLES,
    SAMPLES_SCHEMA,
    TCAC_CASES,
    TCAC_SUMMARY,
    Sample,
    StageStats,
    samples_to_table,
)
from clipaudit.runtime import LocalRunner
from clipaudit.stages.embed import embed_images, run_embed
from clipaudit.stages.tcac import TcacError, load_corpus, run_tcac
from clipaudit.tcac_scoring import caption_key, caption_neighbours, caption_pools, pool_probabilities, ranking
from clipaudit.transforms import RotationParams, TransformParams

INVARIANT = "python:tcac_models:flip_invariant"
SENSITIVE = "python:tcac_models:flip_sensitive"
EMBED = EmbedConfig(batch_size=8, text_batch_size=64, write_every=16)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLACES = ["left", "right", "top", "bottom", "middle"]
THINGS = ["dog", "cat", "bird", "car", "boat", "tree"]
N_IMAGES = 12


def _scene(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A background with two coloured rectangles off the vertical axis (so a mirror image differs)."""
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(2):
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(4, size // 2, 2)
        pixels[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def _caption(rng: np.random.Generator) -> str:
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    return (f"a {pick(COLOURS)} {pick(SHAPES)} near a {pick(COLOURS)} {pick(THINGS)} "
            f"on the {pick(PLACES)} with {int(rng.integers(1, 9))} {pick(THINGS)}s")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Sample]:
    """12 scenes of 32 x 32 pixels (the plug-ins' input size: preprocessing leaves them as they are)."""
    folder = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(7)
    samples = []
    for i in range(N_IMAGES):
        path = folder / f"scene_{i:02d}.png"
        _scene(rng).save(path)
        captions = [_caption(rng) for _ in range(5)]
        samples.append(Sample(image_id=path.name, uri=str(path), captions=captions,
                              caption=max(captions, key=len), source="test"))
    return samples


def make_run(tmp_path: Path, samples: list[Sample], name: str, spec: str = INVARIANT, embed: str = "all",
             **tcac) -> tuple[Config, RunTables, object]:
    """A run dir with the samples ingested and (``embed``: all, images, none) embedded by ``spec``."""
    config = Config(run_dir=str(tmp_path / name), models=ModelsConfig(clip=spec), embed=EMBED,
                    tcac=TcacConfig(**tcac))
    tables = RunTables(config.run_dir)
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    model = resolve_model(spec, "clip")
    if embed == "all":
        run_embed(tables, LocalRunner(), {"clip": model}, EMBED)
    elif embed == "images":
        embed_images(tables, LocalRunner(), {"clip": model}, EMBED, StageStats("embed"))
    return config, tables, model


def cases(tables: RunTables, transform: str | None = None) -> list[dict]:
    rows = tables.read(TCAC_CASES).to_pylist()
    return [r for r in rows if transform is None or r["transform"] == transform]


def test_flip_invariant_model_changes_nothing_under_hflip(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "inv", transforms=["hflip", "rotation"])
    stats = run_tcac(config, tables, LocalRunner(), model)
    hflip = cases(tables, "hflip")
    assert len(hflip) == N_IMAGES and all(json.loads(r["params"]) == {"applied": True} for r in hflip)
    for row in hflip:
        assert row["changed"] == 0 and not row["top1_changed"]
        assert row["top_before"] == row["top_after"] and row["probs_before"] == row["probs_after"]
        assert row["gt_rank_before"] == row["gt_rank_after"] and row["tv_distance"] == 0.0
    assert len(cases(tables, "rotation")) == N_IMAGES
    assert stats.counts["text_encodings"] == 0
    assert stats.counts["originals_reused"] == N_IMAGES and "encoded_original" not in stats.counts
    assert stats.counts["encoded_transformed"] == 2 * N_IMAGES
    summary = {r["transform"]: r for r in tables.read(TCAC_SUMMARY).to_pylist()}
    assert summary["hflip"]["mean_changed"] == 0.0 and summary["hflip"]["top1_changed_share"] == 0.0
    assert summary["hflip"]["recall_at_10_before"] == summary["hflip"]["recall_at_10_after"]


def test_flip_sensitive_model_moves_the_ranking_under_hflip(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "sens", spec=SENSITIVE, transforms=["hflip"])
    run_tcac(config, tables, LocalRunner(), model)
    changed = [r["changed"] for r in cases(tables, "hflip")]
    assert len(changed) == N_IMAGES and max(changed) > 0
    assert tables.read(TCAC_SUMMARY).to_pylist()[0]["mean_changed"] > 0


def _brute_force_pools(tables: RunTables, k: int) -> tuple[list[str], np.ndarray, dict[str, list[int]]]:
    """Unique captions (first-seen order over the samples table), their vectors, and every image's pool by a
    full float64 similarity matrix."""
    samples = tables.read(SAMPLES).to_pylist()
    stored = tables.read(CAPTION_EMBEDDINGS, ["text", "vector"]).to_pylist()
    vector_of = {}
    for row in stored:
        vector_of.setdefault(caption_key(row["text"]), np.asarray(row["vector"], dtype=np.float64))
    keys: list[str] = []
    for sample in samples:
        keys.extend(key for key in map(caption_key, sample["captions"]) if key not in keys)
    vectors = np.stack([vector_of[key] for key in keys])
    sims = vectors @ vectors.T
    pools = {}
    for sample in samples:
        own = list(dict.fromkeys(keys.index(caption_key(c)) for c in sample["captions"]))
        pool = list(own)
        for q in own:
            order = [int(i) for i in np.lexsort((np.arange(len(keys)), -sims[q])) if i != q][:k]
            pool.extend(i for i in order if i not in pool)
        pools[sample["image_id"]] = pool
    return keys, vectors, pools


def test_pool_and_top_captions_match_brute_force(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "pool", transforms=["grayscale"], pool_neighbours=4)
    keys, vectors, want = _brute_force_pools(tables, 4)
    stats = StageStats("tcac")
    built = load_corpus(tables, tables.read(SAMPLES), LocalRunner(), model, EMBED, stats)
    assert [caption_key(t) for t in built.texts] == keys and stats.counts["text_encodings"] == 0
    own = {s.image_id: built.rows(s.captions) for s in corpus}
    got = caption_pools(built, own, 4)
    assert {i: p.tolist() for i, p in got.items()} == want
    assert all(len(p) > 5 for p in want.values())

    run_tcac(config, tables, LocalRunner(), model)
    originals = {r["image_id"]: np.asarray(r["vector"]) for r in tables.read(IMAGE_EMBEDDINGS["clip"]).to_pylist()}
    for row in cases(tables):
        pool = want[row["image_id"]]
        probs = pool_probabilities(originals[row["image_id"]], vectors[pool], 100.0)[0]
        top = [built.texts[pool[i]] for i in ranking(probs)[:10]]
        assert row["pool_size"] == len(pool) and row["top_before"] == top
        np.testing.assert_allclose(row["probs_before"], np.sort(probs)[::-1][:10], rtol=1e-5, atol=1e-7)


def test_the_same_seed_gives_the_same_parameters_and_rows(tmp_path, corpus):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config, tables, model = make_run(tmp_path, corpus, name, seed=seed)
        run_tcac(config, tables, LocalRunner(), model)
        runs.append(sorted(cases(tables), key=lambda r: (r["image_id"], r["transform"])))
    assert len(runs[0]) == 7 * N_IMAGES
    assert runs[0] == runs[1]
    rotation = lambda run: [json.loads(r["params"])["angle"] for r in run if r["transform"] == "rotation"]  # noqa: E731
    assert rotation(runs[0]) == rotation(runs[1]) and rotation(runs[0]) != rotation(runs[2])
    assert len(set(rotation(runs[0]))) == N_IMAGES and all(abs(a) <= 30 for a in rotation(runs[0]))


def test_a_rerun_computes_only_the_missing_pairs(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "rerun", transforms=["hflip"], cases_per_transform=5)
    first = run_tcac(config, tables, LocalRunner(), model)
    assert first.counts["pairs_todo"] == N_IMAGES == first.counts["pairs_written"]
    wider = replace(config, tcac=replace(config.tcac, transforms=["hflip", "invert"]))
    second = run_tcac(wider, tables, LocalRunner(), model)
    assert second.counts["pairs_todo"] == N_IMAGES and second.counts["encoded_transformed"] == N_IMAGES
    before = tables.read(TCAC_CASES)
    versions = tables.db.open_table(TCAC_CASES).version
    third = run_tcac(wider, tables, LocalRunner(), model)
    assert third.counts["pairs_todo"] == 0 and "nothing left to do" in third.notes["summary"]
    assert tables.read(TCAC_CASES).equals(before) and tables.db.open_table(TCAC_CASES).version == versions
    assert [r["transform"] for r in tables.read(TCAC_SUMMARY).to_pylist()] == ["hflip", "invert"]


def test_cases_are_sorted_by_changed_and_marked_with_daf(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "marks", spec=SENSITIVE, transforms=["hflip", "rotation"],
                                     cases_per_transform=4)
    run_tcac(config, tables, LocalRunner(), model)
    rows = cases(tables)
    assert [r["transform"] for r in rows] == ["hflip"] * N_IMAGES + ["rotation"] * N_IMAGES
    for transform in ("hflip", "rotation"):
        part = [r for r in rows if r["transform"] == transform]
        assert [r["rank"] for r in part] == list(range(1, N_IMAGES + 1))
        keys = [(-r["changed"], -r["tv_distance"], r["image_id"]) for r in part]
        assert keys == sorted(keys)
        assert [r["is_case"] for r in part] == [True] * 4 + [False] * (N_IMAGES - 4)
        assert not any(r["daf_case"] for r in part)
    daf_ids = [rows[0]["image_id"], rows[-1]["image_id"]]
    tables.db.create_table("daf_cases", data=pa.table({"image_id": daf_ids, "overlap": [0.1, 0.2]}))
    stats = run_tcac(config, tables, LocalRunner(), model)
    assert stats.counts["pairs_todo"] == 0
    flagged = {(r["image_id"], r["transform"]) for r in cases(tables) if r["daf_case"]}
    assert flagged == {(i, t) for i in daf_ids for t in ("hflip", "rotation")}
    summary = {r["transform"]: r for r in tables.read(TCAC_SUMMARY).to_pylist()}
    assert summary["hflip"]["cases"] == 4 and summary["hflip"]["daf_cases"] >= 1


def test_nothing_embedded_yet_encodes_each_unique_caption_once(tmp_path, corpus):
    broken = Sample(image_id="missing.png", uri=str(tmp_path / "missing.png"), captions=["a lost picture"],
                    caption="a lost picture", source="test")
    duplicate = replace(corpus[0], image_id="copy.png", captions=[c.upper() for c in corpus[0].captions])
    samples = [*corpus, broken, duplicate]
    ref_config, ref_tables, model = make_run(tmp_path, samples, "ref", transforms=["hflip", "elastic"])
    reference = run_tcac(ref_config, ref_tables, LocalRunner(), model)
    assert reference.counts["text_encodings"] == 0 and reference.counts["originals_reused"] == N_IMAGES + 1
    config, tables, _ = make_run(tmp_path, samples, "bare", embed="none", transforms=["hflip", "elastic"])
    stats = run_tcac(config, tables, LocalRunner(), model)
    unique = len({caption_key(c) for s in samples for c in s.captions})
    assert stats.counts["text_encodings"] == stats.counts["unique_captions"] == unique == 5 * N_IMAGES + 1
    assert stats.counts["encoded_original"] == N_IMAGES + 1 and stats.counts["rejected"] == 1
    rejects = tables.read(REJECTS).to_pylist()
    assert [(r["item"], r["stage"], r["reason"]) for r in rejects] == [("missing.png", "tcac", "missing")]
    got = {(r["image_id"], r["transform"]): r for r in cases(tables)}
    want = {(r["image_id"], r["transform"]): r for r in cases(ref_tables)}
    assert got.keys() == want.keys() and len(got) == 2 * (N_IMAGES + 1)
    for key, row in want.items():
        mine = got[key]
        assert (mine["params"], mine["top_before"], mine["top_after"], mine["changed"], mine["gt_rank_after"]) == \
            (row["params"], row["top_before"], row["top_after"], row["changed"], row["gt_rank_after"])
        np.testing.assert_allclose(mine["probs_after"], row["probs_after"], rtol=1e-5, atol=1e-8)
    again = run_tcac(config, tables, LocalRunner(), model)
    assert again.counts["pairs_todo"] == 0 and again.counts["text_encodings"] == 0


def test_changed_settings_or_model_in_the_same_run_dir_are_errors(tmp_path, corpus):
    config, tables, model = make_run(tmp_path, corpus, "settings", transforms=["rotation"])
    run_tcac(config, tables, LocalRunner(), model)
    steeper = replace(config, tcac=replace(config.tcac, params=replace(TransformParams(),
                                                                       rotation=RotationParams(degrees=90.0))))
    with pytest.raises(TcacError, match="rotation.*new run_dir"):
        run_tcac(steeper, tables, LocalRunner(), model)
    with pytest.raises(TcacError, match="new run_dir"):
        run_tcac(config, tables, LocalRunner(), resolve_model(SENSITIVE, "clip"))


class InterruptedRunner(LocalRunner):
    """Dies after ``batches`` transformed batches, as a killed run would."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def map_transformed(self, todo, model, tcac, embed):
        for i, batch in enumerate(super().map_transformed(todo, model, tcac, embed)):
            if i == self.batches:
                raise KeyboardInterrupt("killed")
            yield batch


def test_an_interrupted_run_resumes_to_the_clean_result(tmp_path, corpus):
    small = replace(EMBED, write_every=4)
    config, clean, model = make_run(tmp_path, corpus, "clean", transforms=["affine", "perspective"])
    config = replace(config, embed=small)
    run_tcac(config, clean, LocalRunner(), model)
    resumed_config, resumed, _ = make_run(tmp_path, corpus, "resumed", transforms=["affine", "perspective"])
    resumed_config = replace(resumed_config, embed=small)
    with pytest.raises(KeyboardInterrupt):
        run_tcac(resumed_config, resumed, InterruptedRunner(batches=3), model)
    partial = resumed.count(TCAC_CASES)
    assert 0 < partial < 2 * N_IMAGES
    stats = run_tcac(resumed_config, resumed, LocalRunner(), model)
    assert stats.counts["pairs_todo"] == 2 * N_IMAGES - partial
    assert resumed.read(TCAC_CASES).equals(clean.read(TCAC_CASES))
    assert resumed.read(TCAC_SUMMARY).equals(clean.read(TCAC_SUMMARY))


@pytest.mark.ray
def test_ray_runner_gives_the_same_rows_as_in_process(tmp_path, corpus, ray_local):
    from clipaudit.config import RayConfig
    from clipaudit.runtime import RayRunner

    few = corpus[:6]
    local_config, local, model = make_run(tmp_path, few, "local", spec="tiny-clip", transforms=["hflip", "elastic"])
    run_tcac(local_config, local, LocalRunner(), model)
    ray_config, on_ray, _ = make_run(tmp_path, few, "ray", spec="tiny-clip", transforms=["hflip", "elastic"])
    stats = run_tcac(ray_config, on_ray, RayRunner(RayConfig()), model)
    assert stats.notes["device"] == "cpu" and stats.counts["pairs_written"] == 12
    want = {(r["image_id"], r["transform"]): r for r in cases(local)}
    got = {(r["image_id"], r["transform"]): r for r in cases(on_ray)}
    assert got.keys() == want.keys()
    for key, row in want.items():
        assert got[key]["params"] == row["params"] and got[key]["pool_size"] == row["pool_size"]
        np.testing.assert_allclose(got[key]["probs_after"], row["probs_after"], rtol=1e-3, atol=1e-6)


FLICKR = Path(os.environ.get("CLIPAUDIT_FLICKR8K", Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k"))


@pytest.mark.flickr8k
def test_flickr8k_pools_match_brute_force(tmp_path):
    """The shared Flickr8k sample (300 images, 1,500 captions) with tiny-clip's text tower (random weights: only
    the pool computation is checked, against brute force, tolerating near-ties at the k-th neighbour)."""
    token = FLICKR / "Flickr8k.token.txt"
    if not (token.is_file() and (FLICKR / "images").is_dir()):
        pytest.skip(f"the Flickr8k sample is not at {FLICKR} (set CLIPAUDIT_FLICKR8K to its folder)")
    from clipaudit.config import DatasetConfig
    from clipaudit.stages.embed import embed_captions
    from clipaudit.stages.ingest import run_ingest

    config = Config(run_dir=str(tmp_path / "flickr"), embed=EMBED, models=ModelsConfig(clip="tiny-clip"),
                    dataset=DatasetConfig(format="flickr8k", captions=str(token), images=str(FLICKR / "images")))
    tables = RunTables(config.run_dir)
    run_ingest(config, tables)
    model = resolve_model("tiny-clip", "clip")
    embed_captions(tables, LocalRunner(), {"clip": model}, replace(EMBED, text_batch_size=512),
                   StageStats("embed"))
    keys, vectors, want = _brute_force_pools(tables, 10)
    built = load_corpus(tables, tables.read(SAMPLES), LocalRunner(), model, EMBED, StageStats("tcac"))
    samples = tables.read(SAMPLES).to_pylist()
    assert len(samples) == 300 and [caption_key(t) for t in built.texts] == keys
    got = caption_pools(built, {s["image_id"]: built.rows(s["captions"]) for s in samples}, 10)
    sims = vectors @ vectors.T
    near = caption_neighbours(built, range(len(keys)), 10)
    assert near.queries.tolist() == list(range(len(keys)))
    for q, found in zip(near.queries.tolist(), near.ids.tolist()):
        others = np.delete(sims[q], q)
        kth = np.sort(others)[::-1][9]
        assert len(found) == 10 and q not in found
        assert all(sims[q, i] >= kth - 1e-5 for i in found)
        assert {i for i in range(len(keys)) if i != q and sims[q, i] > kth + 1e-5} <= set(found)
    exact = sum(got[s["image_id"]].tolist() == want[s["image_id"]] for s in samples)
    assert exact >= 0.95 * len(samples), f"only {exact} of {len(samples)} pools match brute force exactly"
