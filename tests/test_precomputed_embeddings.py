"""Precomputed CLIP vectors from a clip-retrieval index: the ``clip_retrieval`` corpus reader, the
``precomputed:INDEX_DIR`` model spec, the embed stage reading the vectors instead of computing them (checked,
aligned, renormalised, rejected), and a full audit on them (the reference computed, TCAC skipped)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipaudit.config import ConfigError, DatasetConfig, load_config
from clipaudit.io.readers import IngestError, read_corpus
from clipaudit.io.tables import RunTables
from clipaudit.models import ModelSpecError, resolve_model
from clipaudit.models.precomputed import NoWeightsError, PrecomputedIndexError, PrecomputedTarget
from clipaudit.pipeline import run_pipeline
from clipaudit.probe.scenes import render_scene, scene_spec
from clipaudit.records import Reject, Sample

DIM = 32
SHARDS = {0: [0, 1, 2, 3, 4], 2: [5, 6, 7, 8], 10: [9, 10, 11, 5, None]}
"""Shard number -> the images of its rows, in row order: shard 10 repeats image 5 (a duplicate: shard 2's row wins,
which only numeric shard order gives) and ends with a row without image path."""
FLOAT16_SHARD = 2
SCALED = (0, 1)
"""(shard, row) whose vector is written with norm 3: renormalised and counted."""
ZERO = (2, 2)
"""(shard, row) whose vector is zero: image 7 becomes a reject."""
ABSOLUTE = 9
"""The image whose image_path is written absolute."""


def caption(index: int) -> str:
    return scene_spec(4, index).captions()[0]


def image_path(root: Path, index: int) -> str:
    name = f"images/img_{index:02d}.png"
    return str(root / name) if index == ABSOLUTE else name


def build_index(root: Path, images: int = 13) -> dict[str, dict[str, np.ndarray]]:
    """Images under ``root/images`` and a clip-retrieval index of the first 12 at ``root/index`` (image 12 is on
    disk but not in the index). Returns image_id -> {"image": unit vector, "text": unit vector} as the index holds
    them (first row of an id), float32 after the shard's dtype, renormalised."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for index in range(images):
        render_scene(scene_spec(4, index)).resize((40, 40)).save(root / "images" / f"img_{index:02d}.png")
    rng = np.random.default_rng(0)
    expected: dict[str, dict[str, np.ndarray]] = {}
    for folder in ("metadata", "img_emb", "text_emb"):
        (root / "index" / folder).mkdir(parents=True, exist_ok=True)
    for number, rows in SHARDS.items():
        image = rng.normal(size=(len(rows), DIM)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text = rng.normal(size=(len(rows), DIM)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        if number == SCALED[0]:
            image[SCALED[1]] *= 3
        if number == ZERO[0]:
            image[ZERO[1]] = 0
        dtype = np.float16 if number == FLOAT16_SHARD else np.float32
        image, text = image.astype(dtype), text.astype(dtype)
        np.save(root / "index" / "img_emb" / f"img_emb_{number}.npy", image)
        np.save(root / "index" / "text_emb" / f"text_emb_{number}.npy", text)
        paths = [None if index is None else image_path(root, index) for index in rows]
        pq.write_table(pa.table({"image_path": pa.array(paths, pa.string()),
                                 "caption": [caption(index) if index is not None else "x" for index in rows]}),
                       root / "index" / "metadata" / f"metadata_{number}.parquet")
        for row, key in enumerate(paths):
            if key is None or key in expected:
                continue
            vectors = {}
            for name, values in (("image", image[row]), ("text", text[row])):
                values = values.astype(np.float32)
                norm = np.linalg.norm(values)
                vectors[name] = values / norm if norm else values
            expected[key] = vectors
    return expected


def vectors_of(table: pa.Table, key: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(table.column(key).to_pylist(),
                                                               table.column("vector").to_pylist())}


def write_config(root: Path, dataset: str, run_dir: Path, index: str) -> Path:
    config = root / f"{run_dir.name}.yaml"
    config.write_text(f"""
run_dir: {run_dir}
dataset: {dataset}
models: {{clip: "precomputed:{index}", reference: tiny-dino}}
embed: {{max_reject_share: 0.5}}
ray: {{runner: local}}
neighbours: {{k: 3}}
tcac: {{transforms: [grayscale]}}
llm: {{dry_run: true}}
""")
    return config


def test_a_full_audit_reads_the_clip_vectors_and_computes_the_reference(tmp_path):
    from clipaudit.cli import main

    expected = build_index(tmp_path)
    index = str(tmp_path / "index")
    spec = f"precomputed:{index}"
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, "{format: clip_retrieval, path: index}", run_dir, index)
    assert main(["run", "--config", str(config)]) == 0

    tables = RunTables(str(run_dir))
    rejects = {(r["item"], r["reason"]) for r in tables.read("rejects").to_pylist()}
    assert ("images/img_07.png", "bad_precomputed_vector") in rejects
    assert ("row 5", "malformed") in rejects and ("row 4", "duplicate") in rejects
    clip = tables.read("image_embeddings_clip")
    assert set(clip.column("model").to_pylist()) == {spec} and set(clip.column("clip_model").to_pylist()) == {spec}
    stored = vectors_of(clip, "image_id")
    assert set(stored) == set(expected) - {"images/img_07.png"}
    for image_id, vector in stored.items():
        np.testing.assert_allclose(vector, expected[image_id]["image"], atol=1e-6)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
    reference = tables.read("image_embeddings_reference")
    assert set(reference.column("image_id").to_pylist()) == set(stored), "the reference skips the rejected image"
    captions = tables.read("caption_embeddings")
    assert set(captions.column("caption_id").to_pylist()) == {f"{image_id}#0" for image_id in expected}
    for caption_id, vector in vectors_of(captions, "caption_id").items():
        np.testing.assert_allclose(vector, expected[caption_id.rsplit("#", 1)[0]]["text"], atol=1e-6)

    neighbours = tables.read("neighbours")
    assert set(neighbours.column("model").to_pylist()) == {"clip", "reference"}
    assert neighbours.num_rows == 2 * len(stored)
    assert tables.read("daf_cases") is not None and tables.read("blind_pairs") is not None
    embed = json.loads((run_dir / "stats" / "embed.json").read_text())
    assert embed["counts"]["renormalised_clip"] == 1
    assert embed["notes"]["precomputed"][spec] == {
        "spec": spec, "source": f"precomputed, from {index}", "shards": 3, "renormalised": 1, "text_vectors": True,
        "captions_left_out": 0}
    tcac = json.loads((run_dir / "stats" / "tcac.json").read_text())
    assert "precomputed" in tcac["notes"]["skipped"] and tables.read("tcac_cases") is None
    page = (run_dir / "report" / "index.html").read_text()
    assert "Skipped. " in page and "precomputed" in page[page.index('id="tcac"'):]

    assert main(["run", "--config", str(config), "--stages", "ingest,embed"]) == 0
    again = json.loads((run_dir / "stats" / "embed.json").read_text())
    assert "nothing left to do" in again["notes"]["summary"]


def test_samples_missing_from_the_index_are_rejects_and_uncovered_captions_are_left_out(tmp_path):
    build_index(tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/img_{i:02d}.png", "captions": caps}) + "\n" for i, caps in
                                [(0, [caption(0), "a second caption"]), (1, [caption(1)]), (2, [caption(2)]),
                                 (12, [caption(12)])]))
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, f"{{format: manifest, captions: {manifest}, caption_columns: [captions]}}",
                          run_dir, str(tmp_path / "index"))
    stats = run_pipeline(load_config(str(config)), ["ingest", "embed"])["embed"]
    tables = RunTables(str(run_dir))
    rejects = tables.read("rejects", where="stage = 'embed'").to_pylist()
    assert [(r["item"], r["reason"]) for r in rejects] == [("images/img_12.png", "no_precomputed_vector")]
    assert stats.counts["captions_without_precomputed_vector"] == 2, "the second caption of 0, the caption of 12"
    captions = tables.read("caption_embeddings").column("caption_id").to_pylist()
    assert sorted(captions) == ["images/img_00.png#0", "images/img_01.png#0", "images/img_02.png#0"]
    assert "2 captions have no precomputed vector" in stats.notes["summary"]


def test_a_misaligned_shard_fails_naming_both_files(tmp_path):
    build_index(tmp_path)
    npy = tmp_path / "index" / "img_emb" / "img_emb_2.npy"
    np.save(npy, np.load(npy)[:-1])
    config = write_config(tmp_path, "{format: clip_retrieval, path: index}", tmp_path / "run",
                          str(tmp_path / "index"))
    with pytest.raises(PrecomputedIndexError, match=r"img_emb_2\.npy.*metadata_2\.parquet"):
        run_pipeline(load_config(str(config)), ["ingest", "embed"])


def test_the_spec_resolves_without_loading_and_only_in_the_clip_role(tmp_path):
    build_index(tmp_path, images=0)
    spec = f"precomputed:{tmp_path / 'index'}"
    resolved = resolve_model(spec, "clip")
    assert isinstance(resolved.target, PrecomputedTarget)
    assert (resolved.dim, resolved.is_random, resolved.target.shards, resolved.target.has_text) == (DIM, False, 3, True)
    with pytest.raises(NoWeightsError, match="read from the clip-retrieval index"):
        resolved.load("cpu")
    with pytest.raises(ModelSpecError, match="models.clip only"):
        resolve_model(spec, "reference")
    with pytest.raises(ModelSpecError, match="cannot read the clip-retrieval index"):
        resolve_model(f"precomputed:{tmp_path / 'nowhere'}", "clip", fallback="tiny")


def test_the_reader_streams_shards_in_numeric_order_with_rejects_by_row(tmp_path):
    build_index(tmp_path)
    out = list(read_corpus(DatasetConfig(format="clip_retrieval", path=str(tmp_path / "index")), str(tmp_path)))
    samples = [s for s in out if isinstance(s, Sample)]
    rejects = [r for r in out if isinstance(r, Reject)]
    assert [s.image_id for s in samples][:6] == [f"images/img_{i:02d}.png" for i in range(6)]
    assert samples[5].source.endswith("metadata_2.parquet"), "metadata_2 is read before metadata_10"
    assert samples[0].uri == str(tmp_path / "images" / "img_00.png") and samples[0].captions == [caption(0)]
    assert samples[9].image_id == str(tmp_path / "images" / "img_09.png")
    assert [(Path(r.source).name, r.item, r.reason) for r in rejects] == [
        ("metadata_10.parquet", "row 4", "duplicate"), ("metadata_10.parquet", "row 5", "malformed")]

    images = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "images", images / "images")
    (tmp_path / "images" / "img_01.png").unlink()
    moved = [s for s in read_corpus(DatasetConfig(format="clip_retrieval", path=str(tmp_path / "index"),
                                                  images=str(images)), str(tmp_path)) if isinstance(s, Sample)]
    assert moved[1].uri == str(images / "images" / "img_01.png") and moved[1].image_id == samples[1].image_id
    missing = [r for r in read_corpus(DatasetConfig(format="clip_retrieval", path=str(tmp_path / "index")),
                                      str(tmp_path)) if isinstance(r, Reject) and r.reason == "missing_image"]
    assert [r.item for r in missing] == ["row 2"]

    pq.write_table(pa.table({"__key__": ["0001"], "caption": ["x"]}), tmp_path / "index/metadata/metadata_0.parquet")
    with pytest.raises(IngestError, match=r"metadata_0\.parquet: no image_path or url column"):
        list(read_corpus(DatasetConfig(format="clip_retrieval", path=str(tmp_path / "index")), str(tmp_path)))


def test_the_config_resolves_the_index_folder_and_checks_it(tmp_path):
    (tmp_path / "index" / "metadata").mkdir(parents=True)
    config = tmp_path / "audit.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndataset: {{format: clip_retrieval, path: index}}\n")
    assert load_config(str(config)).dataset.path == str(tmp_path / "index")
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndataset: {{format: clip_retrieval, path: index}}\n"
                      "models: {clip: [precomputed:index, tiny-clip]}\n")
    assert load_config(str(config)).models.clip_models == [f"precomputed:{tmp_path / 'index'}", "tiny-clip"]
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndataset: {{format: clip_retrieval, path: images}}\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="not a clip-retrieval index folder"):
        load_config(str(config))
    with pytest.raises(ConfigError, match="does not read"):
        load_config(None, ["dataset.format=clip_retrieval", f"dataset.path={tmp_path / 'index'}", "dataset.split=a",
                           f"run_dir={tmp_path / 'run'}"])


def test_validate_is_skipped_for_precomputed_vectors_before_anything_is_sent(tmp_path):
    from clipaudit.stages.validate import run_validate

    config = load_config(None, [f"run_dir={tmp_path / 'run'}", f"models.clip=precomputed:{tmp_path / 'index'}",
                                "llm.dry_run=false", "llm.base_url=http://127.0.0.1:9/v1"])
    stats = run_validate(config, RunTables(config.run_dir))
    assert "no text tower" in stats.notes["skipped"] and not stats.counts
