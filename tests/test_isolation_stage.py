"""Per-row fault isolation through the embed stage: a model whose forward raises on one image (and a caption that
breaks its text tower) costs that row, not the batch; past ``embed.max_reject_share`` the stage fails and says why.

The CLIP-role model is the plug-in :func:`poisoned` below (``python:test_isolation_stage:poisoned``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipaudit.config import EmbedConfig
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
from clipaudit.stages.embed import run_embed, summary_line
from clipaudit.stages.reject_limit import RejectLimitError

POISON = (255, 0, 0)
"""A plain image of this colour makes the plug-in's forward raise, as a degenerate input makes a real model."""
SIZE = 32


class _Poisoned:
    dim = 8
    logit_scale = 100.0

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        rows = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32)
            if (pixels.reshape(-1, 3) == POISON).all():
                raise np.linalg.LinAlgError("lstsq: the input does not have full rank")
            rows.append(np.resize(pixels.mean(axis=(0, 1)), self.dim) + np.arange(self.dim))
        return np.stack(rows)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if any("\u2028poison" in t for t in texts):
            raise UnicodeError("the tokenizer cannot read this caption")
        return np.asarray([[len(t) + k for k in range(self.dim)] for t in texts], np.float32)


def poisoned() -> _Poisoned:
    """The CLIP-role plug-in whose forward raises on plain red images and on captions marked as poison."""
    return _Poisoned()


poisoned.image_size = SIZE


def _write(folder, name: str, colour: tuple[int, int, int] | None, seed: int) -> str:
    if colour is None:
        array = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    else:
        array = np.full((20, 30, 3), colour, dtype=np.uint8)
    path = folder / name
    Image.fromarray(array).save(path)
    return str(path)


def make_run(tmp_path, n_good: int, n_poison: int) -> RunTables:
    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for i in range(n_good + n_poison):
        name = f"img{i:02d}.png"
        uri = _write(folder, name, POISON if i >= n_good else None, i)
        captions = [f"picture number {i}", "a \u2028poison caption" if i == 0 else f"another picture {i}"]
        samples.append(Sample(image_id=name, uri=uri, captions=captions, caption=captions[0], source="test"))
    tables = RunTables(str(tmp_path / "run"))
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    return tables


@pytest.fixture(scope="module")
def models():
    from clipaudit.models import resolve_model

    return {"clip": resolve_model("python:test_isolation_stage:poisoned", "clip"),
            "reference": resolve_model("tiny-dino", "reference")}


def test_one_image_whose_forward_raises_is_one_reject(tmp_path, models):
    tables = make_run(tmp_path, n_good=20, n_poison=1)
    stats = run_embed(tables, LocalRunner(), models, EmbedConfig(batch_size=8, text_batch_size=8))
    rejects = {r["item"]: r for r in tables.read(REJECTS).to_pylist()}
    assert set(rejects) == {"img20.png", "img00.png#1"}
    image = rejects["img20.png"]
    assert (image["stage"], image["reason"]) == ("embed", "forward_failed")
    assert image["detail"] == "forward (clip): LinAlgError: lstsq: the input does not have full rank"
    caption = rejects["img00.png#1"]
    assert caption["reason"] == "forward_failed" and "UnicodeError" in caption["detail"]
    for role in ("clip", "reference"):
        ids = set(tables.read(IMAGE_EMBEDDINGS[role], ["image_id"]).column("image_id").to_pylist())
        assert ids == {f"img{i:02d}.png" for i in range(20)}, role
    assert tables.count(CAPTION_EMBEDDINGS) == 2 * 21 - 1
    assert "21 in = 20 embedded + 1 rejected (1 captions rejected)" in summary_line(stats)
    again = run_embed(tables, LocalRunner(), models, EmbedConfig(batch_size=8, text_batch_size=8))
    assert again.counts["images_todo"] == 0 and again.counts["captions_todo"] == 0


def test_past_the_reject_share_the_stage_fails_with_top_reasons(tmp_path, models):
    tables = make_run(tmp_path, n_good=10, n_poison=2)
    with pytest.raises(RejectLimitError) as err:
        run_embed(tables, LocalRunner(), models, EmbedConfig(batch_size=8, text_batch_size=8))
    message = str(err.value)
    assert "embed: 2 of 12 images rejected (16.7%), more than embed.max_reject_share 5.0%" in message
    assert "forward_failed 2 (e.g. img10.png: forward (clip): LinAlgError" in message
    assert tables.count(IMAGE_EMBEDDINGS["clip"]) == 10, "what was embedded is kept"
