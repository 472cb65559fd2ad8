"""TCAC's transforms on the model actor: applied in batches at the model's input resolution (after the resize,
before the crop), the crop identical to the model's preprocessing, and the pixels scored rebuilt exactly from
the recorded ``tcac_cases.params`` (as the report rebuilds them)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipaudit.batches.tcac import TransformedEncoder, images_per_task, prepare_resized
from clipaudit.config import Config, EmbedConfig, ModelsConfig, TcacConfig
from clipaudit.io.images import decode_image, read_image_bytes
from clipaudit.io.tables import RunTables
from clipaudit.model_view import MAX_ASPECT, center_crop_or_pad, model_inputs, resize_for_model
from clipaudit.models import Preprocess, resolve_model
from clipaudit.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD
from clipaudit.records import SAMPLES, SAMPLES_SCHEMA, TCAC_CASES, Sample, samples_to_table
from clipaudit.runtime import LocalRunner
from clipaudit.stages.tcac import run_tcac
from clipaudit.transforms import (
    CORRUPTION_NAMES,
    TRANSFORM_NAMES,
    TransformParams,
    apply_params,
    expand,
    input_from,
    recreate_transformed,
    sample_params,
    transform_batch,
)

SHAPES = [(1, 1), (1, 7), (7, 1), (3, 150), (150, 3), (500, 375), (375, 500), (64, 64), (20, 1000), (1001, 21),
          (33, 35), (231, 500)]


def _preprocesses() -> list[Preprocess]:
    base = [Preprocess(224, 224, OPENAI_MEAN, OPENAI_STD, "bicubic"),
            Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
            Preprocess(64, 64, OPENAI_MEAN, OPENAI_STD, "bilinear", resize_mode="longest"),
            Preprocess(32, 32, OPENAI_MEAN, OPENAI_STD, "bilinear", kind="rgb", resize_mode="squash"),
            Preprocess(48, 48, OPENAI_MEAN, OPENAI_STD, "bilinear", kind="rgb")]
    if "style" in {f.name for f in dataclasses.fields(Preprocess)}:
        base += [dataclasses.replace(p, style="transformers") for p in base if p.resize_mode != "longest"]
    return base


@pytest.mark.parametrize("preprocess", _preprocesses(), ids=lambda p: f"{p.style}-{p.resize_mode}-{p.image_size}")
def test_resize_then_crop_is_the_models_preprocessing(preprocess):
    rng = np.random.default_rng(0)
    for width, height in SHAPES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        resized = resize_for_model(image, preprocess)
        assert max(resized.shape[:2]) <= MAX_ASPECT * max(min(resized.shape[:2]), preprocess.image_size) + 3
        square = center_crop_or_pad(torch.from_numpy(resized.copy()).permute(2, 0, 1), preprocess.image_size,
                                    preprocess.style)
        ours = model_inputs(square.permute(1, 2, 0).numpy()[None], preprocess)[0]
        assert np.array_equal(ours, preprocess(image)), (width, height)


GRADED = expand(CORRUPTION_NAMES, [2, 5])


def test_a_batch_gives_each_row_what_it_alone_would_get():
    rng = np.random.default_rng(1)
    stack = torch.from_numpy(rng.integers(0, 256, (5, 3, 30, 44), dtype=np.uint8))
    params = TransformParams()
    for name in [*TRANSFORM_NAMES, *GRADED]:
        drawn = [sample_params(name, params, 30, 44, torch.Generator().manual_seed(seed)) for seed in range(5)]
        batched = transform_batch(stack, name, drawn, params)
        for i in range(5):
            assert torch.equal(batched[i], apply_params(stack[i], name, drawn[i], params)), name


def _scene(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        pixels[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


class RecordingEncoder(TransformedEncoder):
    """The actor, keeping the model-size pixels it scored per (image_id, transform)."""

    scored: dict[tuple[str, str], np.ndarray] = {}

    def _transform(self, batch, rows, seconds):
        squares = super()._transform(batch, rows, seconds)
        for row in range(len(rows)):
            key = (str(batch["image_id"][rows.image[row]]), rows.name[row])
            RecordingEncoder.scored[key] = squares[row].copy()
        return squares


class RecordingRunner(LocalRunner):
    def map_transformed(self, todo, model, tcac, embed):
        encoder = RecordingEncoder(model, tcac, "cpu", embed.torch_threads)
        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        for start in range(0, todo.num_rows, per_task):
            chunk = todo.slice(start, per_task)
            batch = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
            yield encoder(prepare_resized(batch, model.preprocess, tcac, embed.max_pixels))


def test_tcac_cases_params_rebuild_the_pixels_scored(tmp_path):
    """tiny-clip (64 px, bicubic) on images of several shapes: every (image, transform) the stage scored is
    rebuilt from its ``params`` and ``settings`` by the report's function, then cropped: the same pixels."""
    rng = np.random.default_rng(3)
    samples = []
    for i, (width, height) in enumerate([(90, 70), (70, 90), (64, 64), (300, 40), (41, 41), (128, 96)]):
        path = tmp_path / f"img_{i}.png"
        _scene(rng, width, height).save(path)
        samples.append(Sample(image_id=path.name, uri=str(path), captions=[f"picture {i} of shapes"],
                              caption=f"picture {i} of shapes", source="test"))
    config = Config(run_dir=str(tmp_path / "run"), models=ModelsConfig(clip="tiny-clip"),
                    embed=EmbedConfig(batch_size=16, text_batch_size=64),
                    tcac=TcacConfig(seed=11, transforms=[*TRANSFORM_NAMES, *CORRUPTION_NAMES], severities=[2, 5]))
    names = [*TRANSFORM_NAMES, *GRADED]
    assert sorted(config.tcac.transforms) == sorted(names)
    tables = RunTables(config.run_dir)
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    model = resolve_model("tiny-clip", "clip")
    RecordingEncoder.scored = {}
    stats = run_tcac(config, tables, RecordingRunner(), model)
    rows = tables.read(TCAC_CASES).to_pylist()
    assert len(rows) == len(samples) * len(names) == stats.counts["pairs_written"]
    uris = {s.image_id: s.uri for s in samples}
    for row in rows:
        model_input = input_from(row["settings"])
        assert model_input is not None and model_input.image_size == model.preprocess.image_size
        image = decode_image(read_image_bytes(uris[row["image_id"]]), 10**8)
        rebuilt = recreate_transformed(image, row["transform"], row["params"], config.tcac.params, model_input)
        square = center_crop_or_pad(torch.from_numpy(np.array(rebuilt)).permute(2, 0, 1), model_input.image_size,
                                    model_input.style)
        scored = RecordingEncoder.scored[(row["image_id"], row["transform"])]
        assert np.array_equal(square.permute(1, 2, 0).numpy(), scored), (row["image_id"], row["transform"])
    perspective = [json.loads(r["params"]) for r in rows if r["transform"] == "perspective"]
    assert all(max(x for x, _ in p["endpoints"]) < 64 * 300 / 40 for p in perspective)
    assert all(f"transform_{name}" in stats.seconds for name in names)
