"""The export's Hugging Face ``datasets`` Parquet (``hf/pairs.parquet``, ``hf/invariance.parquet``): read by
``datasets.load_dataset("parquet", ...)`` with the image columns decoded to the source images, the metadata of
``pairs.parquet`` / ``invariance.parquet`` row for row, license/attribution from the CLI, the samples table or the
Flickr8k default, URIs with ``--images reference``, and the same bytes from the same run."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_benchmark_export_score import audited  # noqa: F401  (the module-scoped audited run, built once here)

from clipaudit.benchmark.export import export_benchmark
from clipaudit.benchmark.format import HF_INVARIANCE, HF_PAIRS
from clipaudit.benchmark.hf_parquet import FLICKR8K_ATTRIBUTION, FLICKR8K_LICENSE, HF_METADATA_KEY
from clipaudit.cli import main
from clipaudit.io.tables import RunTables
from clipaudit.records import SAMPLES, SAMPLES_SCHEMA

LICENSE = "CC BY 4.0"
ATTRIBUTION = "clipaudit test scenes"


@pytest.fixture(scope="module")
def run_dir(audited):  # noqa: F811
    return audited[0]


@pytest.fixture(scope="module")
def bench(run_dir, tmp_path_factory):
    """The run exported through the CLI with --license and --attribution (images copied)."""
    out = tmp_path_factory.mktemp("hf") / "bench"
    assert main(["export", run_dir, str(out), "--llm", "off", "--license", LICENSE,
                 "--attribution", ATTRIBUTION]) == 0
    return out


def _uris(run_dir) -> dict[str, str]:
    table = RunTables(str(run_dir)).read(SAMPLES, ["image_id", "uri"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _load(path):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(path), split="train",
                        cache_dir=str(path.parent.parent / ".hf-cache"))


def test_load_dataset_reads_the_pairs_with_images_metadata_and_licence(bench, run_dir):
    from datasets import Image as HFImage

    pairs = pq.read_table(bench / "pairs.parquet").to_pylist()
    assert pairs
    dataset = _load(bench / HF_PAIRS)
    assert isinstance(dataset.features["image_a"], HFImage) and isinstance(dataset.features["image_b"], HFImage)
    assert len(dataset) == len(pairs)
    uris = _uris(run_dir)
    for row, pair in zip(dataset, pairs, strict=True):
        assert row["image_id_a"] == pair["image_a"] and row["image_id_b"] == pair["image_b"]
        for key in ("pair_id", "caption_a", "caption_b", "kind", "blind_pair", "daf_case", "clip_sim",
                    "reference_sim", "llm_caption_a", "llm_caption_b"):
            assert row[key] == pair[key], key
        for side in ("a", "b"):
            assert isinstance(row[f"image_{side}"], Image.Image)
            with Image.open(uris[pair[f"image_{side}"]]) as source:
                assert np.array_equal(_pixels(row[f"image_{side}"]), _pixels(source))
        assert (row["license"], row["attribution"]) == (LICENSE, ATTRIBUTION)

    raw = pq.read_table(bench / HF_PAIRS)
    assert raw.schema.field("image_a").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    first = raw.slice(0, 1).to_pylist()[0]
    assert first["image_a"]["path"] == pairs[0]["file_a"]
    assert first["image_a"]["bytes"] == (bench / pairs[0]["file_a"]).read_bytes()
    features = json.loads(raw.schema.metadata[HF_METADATA_KEY])["info"]["features"]
    assert features["image_a"] == {"_type": "Image"}
    assert features["kind"] == {"dtype": "string", "_type": "Value"}

    manifest = json.loads((bench / "benchmark.json").read_text())
    for name in (HF_PAIRS, HF_INVARIANCE):
        assert manifest["files"][name] == hashlib.sha256((bench / name).read_bytes()).hexdigest()
    assert manifest["license"] == {"license": LICENSE, "attribution": ATTRIBUTION, "per_image": []}
    card = (bench / "README.md").read_text()
    assert f'data_files="BENCH_DIR/{HF_PAIRS}"' in card and HF_INVARIANCE in card
    assert f"- License: {LICENSE}" in card and f"- Attribution: {ATTRIBUTION}" in card


def test_load_dataset_reads_the_invariance_probes(bench, run_dir):
    probes = pq.read_table(bench / "invariance.parquet").to_pylist()
    assert probes
    dataset = _load(bench / HF_INVARIANCE)
    assert len(dataset) == len(probes)
    uris = _uris(run_dir)
    for row, probe in zip(dataset, probes, strict=True):
        for key in ("probe_id", "image_id", "transform", "params", "settings", "caption", "pool",
                    "audited_rank_before", "audited_rank_after"):
            assert row[key] == probe[key], key
        with Image.open(uris[probe["image_id"]]) as source:
            assert np.array_equal(_pixels(row["image"]), _pixels(source))
        assert (row["license"], row["attribution"]) == (LICENSE, ATTRIBUTION)


def test_reference_mode_writes_no_bytes_and_the_uri_as_path(run_dir, tmp_path):
    bench = tmp_path / "ref"
    export_benchmark(run_dir, str(bench), images="reference", llm="off")
    uris = _uris(run_dir)
    rows = pq.read_table(bench / HF_PAIRS).to_pylist()
    assert rows
    for row in rows:
        for side in ("a", "b"):
            assert row[f"image_{side}"] == {"bytes": None, "path": uris[row[f"image_id_{side}"]]}
        assert row["license"] is None and row["attribution"] is None
    assert all(r["image"]["bytes"] is None and r["image"]["path"] == uris[r["image_id"]]
               for r in pq.read_table(bench / HF_INVARIANCE).to_pylist())
    first = _load(bench / HF_PAIRS)[0]
    with Image.open(uris[first["image_id_a"]]) as source:
        assert np.array_equal(_pixels(first["image_a"]), _pixels(source))
    assert "- License, attribution: none given" in (bench / "README.md").read_text()


def test_samples_columns_win_over_the_flickr8k_default(run_dir, tmp_path):
    """A run whose samples table has a license column (null for some images) and whose dataset is Flickr8k:
    the samples value where there is one, else the Flickr8k default; no attribution column: the default."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config_path = copy / "config.resolved.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["dataset"] = {**(config.get("dataset") or {}), "format": "flickr8k"}
    config_path.write_text(yaml.safe_dump(config))
    tables = RunTables(str(copy))
    samples = tables.read(SAMPLES)
    own = {image_id: f"licence of {image_id}" for image_id in samples.column("image_id").to_pylist()[::2]}
    schema = SAMPLES_SCHEMA.append(pa.field("license", pa.string()))
    tables.replace(SAMPLES, samples.append_column("license", pa.array(
        [own.get(i) for i in samples.column("image_id").to_pylist()], pa.string())), schema)

    bench = tmp_path / "bench"
    manifest = export_benchmark(str(copy), str(bench), llm="off")
    assert manifest["license"] == {"license": FLICKR8K_LICENSE, "attribution": FLICKR8K_ATTRIBUTION,
                                   "per_image": ["license"]}
    probes = pq.read_table(bench / HF_INVARIANCE).to_pylist()
    assert {p["image_id"] in own for p in probes} == {True, False}
    for probe in probes:
        assert probe["license"] == own.get(probe["image_id"], FLICKR8K_LICENSE)
        assert probe["attribution"] == FLICKR8K_ATTRIBUTION
    for pair in pq.read_table(bench / HF_PAIRS).to_pylist():
        a, b = (own.get(pair[f"image_id_{s}"], FLICKR8K_LICENSE) for s in ("a", "b"))
        assert pair["license"] == (a if a == b else f"image_a: {a} | image_b: {b}")
    card = (bench / "README.md").read_text()
    assert "- License: per image, in the `license` column" in card and FLICKR8K_LICENSE in card


def test_the_same_run_exports_the_same_hf_bytes(bench, run_dir, tmp_path):
    again = tmp_path / "again"
    assert main(["export", run_dir, str(again), "--llm", "off", "--license", LICENSE,
                 "--attribution", ATTRIBUTION]) == 0
    for name in (HF_PAIRS, HF_INVARIANCE):
        assert (bench / name).read_bytes() == (again / name).read_bytes(), name
