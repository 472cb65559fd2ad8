"""Hugging Face datasets as input: datasets written by the ``datasets`` library itself (save_to_disk, a DatasetDict,
Parquet, a hub-cache layout), embedded image bytes or paths, caption lists, rejects with their row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest

from clipaudit.config import ConfigError, DatasetConfig, load_config
from clipaudit.io.readers import IngestError, read_corpus
from clipaudit.io.readers.hf_dataset import data_files
from clipaudit.probe.scenes import render_scene, scene_spec
from clipaudit.records import Reject, Sample


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    render_scene(scene_spec(4, index)).resize((48, 48)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(n: int = 6):
    """n rows: Image() values with embedded bytes, a list of captions, an id; row 3 has no caption."""
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")),
                                  "key": datasets.Value("string")})
    rows = {"image": [{"bytes": png(i), "path": None} for i in range(n)],
            "captions": [[] if i == 2 else [scene_spec(4, i).captions()[0], f"picture {i}"] for i in range(n)],
            "key": [f"k{i}" for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features)


def read(cfg: DatasetConfig, work: Path) -> tuple[list[Sample], list[Reject]]:
    out = list(read_corpus(cfg, str(work)))
    return [s for s in out if isinstance(s, Sample)], [r for r in out if isinstance(r, Reject)]


def test_a_saved_dataset_with_embedded_images_is_read_and_extracted_once(tmp_path):
    folder = tmp_path / "saved"
    image_dataset().save_to_disk(str(folder))
    cfg = DatasetConfig(format="hf_dataset", path=str(folder), caption_columns=["captions"])
    samples, rejects = read(cfg, tmp_path / "work")
    assert len(samples) == 5 and [r.reason for r in rejects] == ["no_caption"] and rejects[0].item == "row 3"
    first = samples[0]
    assert first.captions == [scene_spec(4, 0).captions()[0], "picture 0"]
    assert Path(first.uri).read_bytes() == png(0) and first.uri.endswith(".png")
    assert first.image_id.endswith("/000001")
    mtime = Path(first.uri).stat().st_mtime_ns
    again, _ = read(DatasetConfig(format="hf_dataset", path=str(folder), caption_columns=["captions"],
                                  id_column="key"), tmp_path / "work")
    assert [s.image_id for s in again] == ["k0", "k1", "k3", "k4", "k5"]
    assert Path(again[0].uri).stat().st_mtime_ns == mtime, "extracted images are written once"


def test_a_dataset_dict_picks_its_split_and_parquet_files_are_read_by_split(tmp_path):
    dd = datasets.DatasetDict({"train": image_dataset(4), "test": image_dataset(2)})
    dd.save_to_disk(str(tmp_path / "dict"))
    test_cfg = DatasetConfig(format="hf_dataset", path=str(tmp_path / "dict"), caption_columns=["captions"],
                             split="test")
    assert len(read(test_cfg, tmp_path / "w1")[0]) == 2
    with pytest.raises(IngestError, match="splits"):
        data_files(str(tmp_path / "dict"), "validation")

    hub = tmp_path / "hub" / "datasets--me--shapes" / "snapshots" / "abc123" / "data"
    hub.mkdir(parents=True)
    image_dataset(4).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    image_dataset(2).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    single = DatasetConfig(format="hf_dataset", path=str(hub / "train-00000-of-00001.parquet"),
                           caption_columns=["captions"])
    assert len(read(single, tmp_path / "w2")[0]) == 3


def test_a_dataset_in_the_hub_cache_is_found_by_its_repo_id(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "datasets--me--shapes" / "snapshots" / "abc123" / "data"
    snapshot.mkdir(parents=True)
    image_dataset(4).to_parquet(str(snapshot / "train-00000-of-00001.parquet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = DatasetConfig(format="hf_dataset", path="me/shapes", caption_columns=["captions"], split="train")
    samples, rejects = read(cfg, tmp_path / "work")
    assert len(samples) == 3 and len(rejects) == 1
    with pytest.raises(IngestError, match="Hugging Face cache"):
        data_files("me/other", None)


def test_image_paths_and_bad_cells_become_rejects_with_their_row(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png(0))
    ds = datasets.Dataset.from_dict({"file": ["images/a.png", "images/missing.png", None, "images/a.png"],
                                     "caption": ["a red circle", "a blue square", "x", None]})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    cfg = DatasetConfig(format="hf_dataset", path=str(tmp_path / "rows.parquet"), image_column="file")
    samples, rejects = read(cfg, tmp_path / "work")
    assert [s.uri for s in samples] == [str(images / "a.png")]
    assert [(r.item, r.reason) for r in rejects] == [("row 2", "missing_image"), ("row 3", "malformed"),
                                                    ("row 4", "no_caption")]
    with pytest.raises(IngestError, match="no column 'image'"):
        read(DatasetConfig(format="hf_dataset", path=str(tmp_path / "rows.parquet")), tmp_path / "work")


def test_the_config_checks_the_path_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        load_config(None, ["dataset.format=hf_dataset", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, ["dataset.format=hf_dataset", f"dataset.path={tmp_path / 'nope'}", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="does not read"):
        load_config(None, ["dataset.format=manifest", "dataset.split=train", f"run_dir={tmp_path}"])


def test_an_hf_dataset_runs_through_a_full_audit(tmp_path):
    from clipaudit.cli import main

    folder = tmp_path / "saved"
    image_dataset(12).save_to_disk(str(folder))
    run_dir = tmp_path / "run"
    config = tmp_path / "audit.yaml"
    config.write_text(f"""
run_dir: {run_dir}
dataset: {{format: hf_dataset, path: {folder}, image_column: image, caption_columns: [captions]}}
models: {{clip: tiny-clip, reference: tiny-dino}}
ray: {{runner: local}}
neighbours: {{k: 3}}
tcac: {{transforms: [grayscale]}}
llm: {{dry_run: true}}
""")
    assert main(["run", "--config", str(config)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["in"] == 11 and summary["counts"]["embedded"] == 11
    assert summary["counts"]["rejects_by_reason"] == {"ingest/no_caption": 1}
    assert all(summary["stages"][stage]["ran"] for stage in ("embed", "neighbours", "daf", "name", "tcac"))
    assert main(["run", "--config", str(config), "--stages", "ingest,embed"]) == 0
