"""Transforms are total: every transform, on every awkward image and many seeds, gives a valid image or a clear
per-row reject; a row that raises in the actor's batch is rejected alone, the batch goes on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipaudit.batches.tcac import ORIGINAL, TRANSFORM_FAILED, TransformedEncoder, prepare_resized
from clipaudit.config import TcacConfig
from clipaudit.models import resolve_model
from clipaudit.records import OK
from clipaudit.transforms import (
    CORRUPTION_NAMES,
    TRANSFORM_NAMES,
    PerspectiveParams,
    TransformFailed,
    TransformParams,
    expand,
    sample_params,
    transform_batch,
)

SEEDS = range(12)


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def hostile_images() -> dict[str, bytes]:
    """1x1, 1xN, Nx1, 1:50 and 50:1, palette with transparency, animated GIF, 16-bit, CMYK, LA."""
    rng = np.random.default_rng(5)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    files = {f"rgb_{w}x{h}.png": _png(rgb(w, h)) for w, h in [(1, 1), (1, 9), (9, 1), (4, 200), (200, 4)]}
    palette = rgb(12, 10).convert("P")
    files["palette_transparent.png"] = _png(palette, transparency=0)
    frames = [rgb(16, 12).convert("P") for _ in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["animated.gif"] = buffer.getvalue()
    files["gray16.png"] = _png(Image.fromarray(np.arange(15 * 11, dtype=np.uint16).reshape(11, 15) * 397))
    buffer = io.BytesIO()
    rgb(14, 9).convert("CMYK").save(buffer, format="JPEG")
    files["cmyk.jpg"] = buffer.getvalue()
    la = Image.merge("LA", [rgb(10, 13).convert("L"), Image.new("L", (10, 13), 128)])
    files["la.png"] = _png(la)
    files["one_pixel_la.png"] = _png(Image.new("LA", (1, 1), (30, 0)))
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, data in hostile_images().items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def tiny_clip():
    return resolve_model("tiny-clip", "clip")


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return TransformedEncoder(tiny_clip, TcacConfig())


GRADED = expand(CORRUPTION_NAMES, [1, 5])


@pytest.mark.parametrize("seed", SEEDS)
def test_every_transform_on_every_awkward_image_gives_a_valid_row(hostile, tiny_clip, encoder, seed):
    tcac = TcacConfig(seed=seed)
    names = ",".join([ORIGINAL, *TRANSFORM_NAMES, *GRADED])
    batch = {"image_id": np.asarray(list(hostile), dtype=object),
             "uri": np.asarray([str(p) for p in hostile.values()], dtype=object),
             "transforms": np.asarray([names] * len(hostile), dtype=object)}
    prepared = prepare_resized(batch, tiny_clip.preprocess, tcac, 10**8)
    assert list(prepared["status"]) == [OK] * len(hostile), list(zip(prepared["image_id"], prepared["detail"]))
    encoder.tcac = tcac
    out = encoder(prepared)
    assert len(out["image_id"]) == len(hostile) * (len(TRANSFORM_NAMES) + len(GRADED) + 1)
    for status, detail in zip(out["status"], out["detail"]):
        assert status == OK or (status == TRANSFORM_FAILED and ": " in detail), detail
    vectors = out["vector_clip"][out["status"] == OK]
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert all(json.loads(p) is not None for p in out["params"])


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (2, 100), (100, 2), (3, 3)])
@pytest.mark.parametrize("name", [*TRANSFORM_NAMES, *GRADED])
def test_the_kernels_are_total_on_raw_tiny_images(shape, name):
    """On images smaller than any model input (the report re-creates old rows at full size): a valid image or a
    TransformFailed that says why, never another exception."""
    height, width = shape
    params = TransformParams(perspective=PerspectiveParams(distortion_scale=1.0))
    stack = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, height, width), dtype=np.uint8))
    for seed in range(25):
        drawn = sample_params(name, params, height, width, torch.Generator().manual_seed(seed))
        try:
            (out,) = transform_batch(stack, name, [drawn], params)
        except TransformFailed as exc:
            assert name == "perspective" and "homography" in str(exc)
            continue
        assert out.dtype == torch.uint8 and out.shape == (3, height, width)


def test_a_row_that_raises_is_rejected_alone(hostile, tiny_clip):
    """A degenerate perspective in the middle of a batch: that row is ``transform_failed`` with the exception,
    the other rows of the same transform and image are scored."""
    tcac = TcacConfig(transforms=["perspective", "rotation"])
    ids = ["rgb_1x9.png", "cmyk.jpg", "la.png"]
    batch = {"image_id": np.asarray(ids, dtype=object),
             "uri": np.asarray([str(hostile[i]) for i in ids], dtype=object),
             "transforms": np.asarray(["perspective,rotation"] * 3, dtype=object)}
    prepared = prepare_resized(batch, tiny_clip.preprocess, tcac, 10**8)
    drawn = json.loads(prepared["params"][1])
    drawn[0] = {"applied": True, "startpoints": [[0, 0], [5, 0], [5, 5], [0, 5]],
                "endpoints": [[2, 2], [2, 2], [2, 2], [2, 2]]}
    prepared["params"][1] = json.dumps(drawn)
    out = TransformedEncoder(tiny_clip, tcac)(prepared)
    rows = list(zip(out["image_id"], out["transform"], out["status"]))
    failed = [r for r in rows if r[2] != OK]
    assert failed == [("cmyk.jpg", "perspective", TRANSFORM_FAILED)]
    detail = out["detail"][rows.index(failed[0])]
    assert detail.startswith("perspective: TransformFailed:") and "homography" in detail
    assert sum(status == OK for *_, status in rows) == 5
    assert np.count_nonzero(np.linalg.norm(out["vector_clip"], axis=1)) == 5


def test_an_unreadable_image_rejects_its_rows_with_its_reason(tmp_path, tiny_clip):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    batch = {"image_id": np.asarray(["broken.png"], dtype=object), "uri": np.asarray([str(broken)], dtype=object),
             "transforms": np.asarray(["hflip,elastic"], dtype=object)}
    out = TransformedEncoder(tiny_clip, TcacConfig())(prepare_resized(batch, tiny_clip.preprocess, TcacConfig(),
                                                                      10**8))
    assert list(out["transform"]) == ["hflip", "elastic"] and set(out["status"]) == {"undecodable"}
