"""The embed stage end to end on generated images: in-process and through local Ray, with resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from fixtures_images import GOOD, write_image_zoo

from clipaudit.config import EmbedConfig, RayConfig
from clipaudit.io.tables import RunTables
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    IMAGE_EMBEDDINGS,
    REJECTS,
    SAMPLES,
    SAMPLES_SCHEMA,
    Sample,
    samples_to_table,
)
from clipaudit.runtime import LocalRunner
from clipaudit.stages.embed import EmbedError, run_embed, summary_line

EMBED = EmbedConfig(batch_size=4, text_batch_size=8, write_every=5, max_reject_share=1.0)
"""The zoo is half bad files on purpose: no reject limit here (it has its own test)."""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def models():
    from clipaudit.models import resolve_model

    return {"clip": resolve_model("tiny-clip", "clip"), "reference": resolve_model("tiny-dino", "reference")}


def make_run(tmp_path, zoo, name="run") -> RunTables:
    tables = RunTables(str(tmp_path / name))
    samples = [Sample(image_id=file, uri=str(path), captions=[f"caption {i} of {file}", f"another {file}"],
                      caption=f"another {file}", source="zoo") for i, (file, (path, _)) in enumerate(zoo.items())]
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    return tables


def vectors(tables: RunTables, name: str, key: str = "image_id") -> dict[str, np.ndarray]:
    table = tables.read(name)
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(table.column(key).to_pylist(),
                                                                table.column("vector").to_pylist())}


def model_vectors(tables: RunTables, name: str, key: str) -> dict[tuple[str, str], np.ndarray]:
    """The vectors of table ``name`` by (``key``, the model's spec): several models' rows side by side."""
    table = tables.read(name)
    spec = "clip_model" if "clip_model" in table.column_names else "reference_model"
    return {(k, m): np.asarray(v, dtype=np.float32) for k, m, v in zip(
        table.column(key).to_pylist(), table.column(spec).to_pylist(), table.column("vector").to_pylist())}


def rejects(tables: RunTables) -> dict[str, str]:
    table = tables.read(REJECTS, where="stage = 'embed'")
    return dict(zip(table.column("item").to_pylist(), table.column("reason").to_pylist()))


def test_every_image_ends_embedded_or_rejected_with_its_reason(tmp_path, zoo, models):
    tables = make_run(tmp_path, zoo)
    stats = run_embed(tables, LocalRunner(), models, EMBED)
    good = {name for name, (_, expected) in zoo.items() if expected == GOOD}
    assert set(vectors(tables, IMAGE_EMBEDDINGS["clip"])) == good
    assert set(vectors(tables, IMAGE_EMBEDDINGS["reference"])) == good
    assert rejects(tables) == {name: expected for name, (_, expected) in zoo.items() if expected != GOOD}
    assert stats.counts["total_in"] == stats.counts["total_embedded"] + stats.counts["total_rejected"] == len(zoo)
    assert f"{len(zoo)} in = {len(good)} embedded + {len(zoo) - len(good)} rejected" in summary_line(stats)
    assert tables.count(CAPTION_EMBEDDINGS) == 2 * len(zoo)
    for name in (IMAGE_EMBEDDINGS["clip"], IMAGE_EMBEDDINGS["reference"], CAPTION_EMBEDDINGS):
        key = "caption_id" if name == CAPTION_EMBEDDINGS else "image_id"
        norms = np.linalg.norm(np.stack(list(vectors(tables, name, key).values())), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert {"read", "decode", "infer_clip", "infer_reference", "infer_text", "write"} <= set(stats.seconds)


def test_rerun_writes_nothing_and_says_so(tmp_path, zoo, models):
    tables = make_run(tmp_path, zoo)
    run_embed(tables, LocalRunner(), models, EMBED)
    before = {name: tables.count(name) for name in tables.names()}
    stats = run_embed(tables, LocalRunner(), models, EMBED)
    assert {name: tables.count(name) for name in tables.names()} == before
    assert stats.counts["images_todo"] == 0 and stats.counts["captions_todo"] == 0
    assert "nothing left to do" in summary_line(stats)


class InterruptedRunner(LocalRunner):
    """Dies after ``batches`` image batches, as a killed run would."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def map_images(self, todo, models, embed):
        for i, batch in enumerate(super().map_images(todo, models, embed)):
            if i == self.batches:
                raise KeyboardInterrupt("killed")
            yield batch


def test_interrupted_run_resumes_to_exactly_the_clean_result(tmp_path, zoo, models):
    clean = make_run(tmp_path, zoo, "clean")
    run_embed(clean, LocalRunner(), models, EMBED)
    resumed = make_run(tmp_path, zoo, "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_embed(resumed, InterruptedRunner(batches=2), models, EMBED)
    partial = resumed.count(IMAGE_EMBEDDINGS["clip"])
    assert 0 < partial < len(vectors(clean, IMAGE_EMBEDDINGS["clip"]))
    assert resumed.count(IMAGE_EMBEDDINGS["reference"]) == partial
    partial_rejects = len(rejects(resumed))
    stats = run_embed(resumed, LocalRunner(), models, EMBED)
    assert stats.counts["images_todo"] == len(zoo) - partial - partial_rejects
    for name in (IMAGE_EMBEDDINGS["clip"], IMAGE_EMBEDDINGS["reference"]):
        got, want = vectors(resumed, name), vectors(clean, name)
        assert got.keys() == want.keys() and resumed.count(name) == len(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5)
    assert rejects(resumed) == rejects(clean)
    assert resumed.count(CAPTION_EMBEDDINGS) == clean.count(CAPTION_EMBEDDINGS)


def test_a_role_added_later_embeds_only_that_role(tmp_path, zoo, models):
    tables = make_run(tmp_path, zoo)
    run_embed(tables, LocalRunner(), {"clip": models["clip"]}, EMBED)
    stats = run_embed(tables, LocalRunner(), models, EMBED)
    good = sum(1 for _, expected in zoo.values() if expected == GOOD)
    assert stats.counts.get("embedded_clip", 0) == 0
    assert stats.counts["embedded_reference"] == good


def test_a_spec_that_now_resolves_to_another_model_is_an_error(tmp_path, zoo, models):
    """Rows are keyed by the spec as written (clip_model); the same spec resolving to another model (a fallback
    that now finds the weights) must not mix two models' vectors under one key."""
    tables = make_run(tmp_path, zoo)
    run_embed(tables, LocalRunner(), {"clip": models["clip"]}, EMBED)
    moved = dataclasses.replace(models["clip"], spec="open_clip:ViT-B-32/openai")
    with pytest.raises(EmbedError, match="new run_dir"):
        run_embed(tables, LocalRunner(), {"clip": moved}, EMBED)


def test_a_second_clip_model_embeds_only_its_rows_keyed_by_its_spec(tmp_path, zoo, models):
    tables = make_run(tmp_path, zoo)
    run_embed(tables, LocalRunner(), models, EMBED)
    second = dataclasses.replace(models["clip"], requested_spec="tiny-clip-second")
    stats = run_embed(tables, LocalRunner(), {**models, "clip_2": second}, EMBED)
    good = sum(1 for _, expected in zoo.values() if expected == GOOD)
    assert stats.counts.get("embedded_clip", 0) == 0 and stats.counts.get("embedded_reference", 0) == 0
    assert stats.counts["embedded_clip_2"] == good
    assert stats.notes["embedded_by_model"] == {"tiny-clip-second": good}
    rows = tables.read("image_embeddings_clip", ["image_id", "clip_model"])
    assert sorted(set(rows.column("clip_model").to_pylist())) == ["tiny-clip", "tiny-clip-second"]
    assert rows.num_rows == 2 * good
    captions = tables.read("caption_embeddings", ["caption_id", "clip_model"])
    assert captions.num_rows == 2 * len(set(captions.column("caption_id").to_pylist()))


def test_no_samples_is_an_error(tmp_path, models):
    with pytest.raises(EmbedError, match="ingest"):
        run_embed(RunTables(str(tmp_path / "empty")), LocalRunner(), models, EMBED)


@pytest.mark.ray
@pytest.mark.parametrize("pools", ["shared", "per_model"])
def test_ray_runner_gives_the_same_rows_as_in_process(tmp_path, zoo, models, ray_local, pools):
    """Both actor layouts of the image and caption passes (one pool whose actors host every model; a pool per
    model) give the in-process rows, with two CLIP models of different dimensions."""
    from clipaudit.models import resolve_model
    from clipaudit.runtime import RayRunner

    models = {**models, "clip_2": resolve_model("probe-clip", "clip")}
    local = make_run(tmp_path, zoo, "local")
    run_embed(local, LocalRunner(), models, EMBED)
    on_ray = make_run(tmp_path, zoo, "ray")
    stats = run_embed(on_ray, RayRunner(RayConfig()), models, dataclasses.replace(EMBED, actor_pools=pools))
    assert stats.notes["device"] == "cpu"
    for name, key in ((IMAGE_EMBEDDINGS["clip"], "image_id"), (IMAGE_EMBEDDINGS["reference"], "image_id"),
                      (CAPTION_EMBEDDINGS, "caption_id")):
        got, want = model_vectors(on_ray, name, key), model_vectors(local, name, key)
        assert got.keys() == want.keys()
        assert {spec for _, spec in want} == ({"tiny-dino"} if name == IMAGE_EMBEDDINGS["reference"]
                                              else {"tiny-clip", "probe-clip"})
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-4)
    assert rejects(on_ray) == rejects(local)
    assert isinstance(on_ray.read(SAMPLES), pa.Table)


def test_each_distinct_caption_text_is_encoded_once(tmp_path, zoo, models):
    tables = RunTables(str(tmp_path / "dupes"))
    good = [(file, path) for file, (path, expected) in zoo.items() if expected == GOOD]
    samples = [Sample(image_id=file, uri=str(path), captions=["a shared caption", f"only {file}"],
                      caption=f"only {file}", source="zoo") for file, path in good]
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    stats = run_embed(tables, LocalRunner(), {"clip": models["clip"]}, EMBED)
    assert stats.counts["text_encodings"] == len(good) + 1
    captions = vectors(tables, CAPTION_EMBEDDINGS, "caption_id")
    assert len(captions) == 2 * len(good)
    shared = [captions[f"{file}#0"] for file, _ in good]
    for vector in shared[1:]:
        np.testing.assert_array_equal(vector, shared[0])


class CountingRunner(LocalRunner):
    """The in-process runner, counting its caption passes and the texts each model was asked to encode."""

    def __init__(self) -> None:
        self.text_passes: list[dict[str, int]] = []

    def map_texts(self, texts, models, embed):
        self.text_passes.append({slot: sum(texts.column(f"need_{slot}").to_pylist()) for slot in models})
        return super().map_texts(texts, models, embed)


def test_one_caption_pass_serves_every_clip_model_each_encoding_what_it_lacks(tmp_path, zoo, models):
    """Two CLIP models, the second added on a re-run: one text pass per run; on the re-run only the new model
    encodes, every distinct text once, and its vectors are its own text tower's."""
    from clipaudit.models import resolve_model

    tables = make_run(tmp_path, zoo)
    first = CountingRunner()
    run_embed(tables, first, models, EMBED)
    texts = {t for captions in tables.read(SAMPLES, ["captions"]).column("captions").to_pylist() for t in captions}
    assert first.text_passes == [{"clip": len(texts)}]
    before = model_vectors(tables, CAPTION_EMBEDDINGS, "caption_id")

    both = {**models, "clip_2": resolve_model("probe-clip", "clip")}
    again = CountingRunner()
    stats = run_embed(tables, again, both, EMBED)
    assert again.text_passes == [{"clip_2": len(texts)}]
    assert stats.counts["captions_todo"] == 2 * len(zoo) and stats.counts["text_encodings"] == len(texts)
    after = model_vectors(tables, CAPTION_EMBEDDINGS, "caption_id")
    assert {k: v for k, v in after.items() if k[1] == "tiny-clip"}.keys() == before.keys()
    text_of = {f"{image_id}#{n}": text for image_id, captions in zip(
        *tables.read(SAMPLES, ["image_id", "captions"]).to_pydict().values()) for n, text in enumerate(captions)}
    new = {caption_id: v for (caption_id, spec), v in after.items() if spec == "probe-clip"}
    assert new.keys() == text_of.keys()
    loaded = both["clip_2"].load("cpu")
    ids = sorted(new)
    np.testing.assert_allclose(np.stack([new[i] for i in ids]), loaded.encode_texts([text_of[i] for i in ids]),
                               atol=1e-5)
    assert run_embed(tables, (third := CountingRunner()), both, EMBED) and third.text_passes == []


def test_a_shared_actor_gets_the_threads_its_models_would_have_had_apart():
    """On CPU, an actor hosting two models at a 0.5 share runs 2 threads (two actors of their own: 1 each); a set
    ``torch_threads`` is per actor; a GPU actor keeps 1; with pools per model the placement has one pool per model."""
    from clipaudit.placement import Placement
    from clipaudit.runtime.runners import pass_pools, shared_threads

    cpu = Placement("cpu", 0.5, 0.0, threads=1)
    assert shared_threads(cpu, EMBED, 2) == 2
    assert shared_threads(Placement("cpu", 1.5, 0.0, threads=2), EMBED, 3) == 6
    set_threads = dataclasses.replace(EMBED, torch_threads=3)  # the placement then has threads=3
    assert shared_threads(Placement("cpu", 0.5, 0.0, threads=3), set_threads, 2) == 3
    assert shared_threads(Placement("cuda", 1.0, 1.0, threads=1), EMBED, 4) == 1
    assert pass_pools(EMBED, 4) == 1
    assert pass_pools(dataclasses.replace(EMBED, actor_pools="per_model"), 4) == 4
