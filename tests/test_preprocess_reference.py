"""Preprocessing identical to the reference implementations, through the embed stage's own read and decode path.

References: for ``hf:`` models transformers' image processor as ``AutoImageProcessor`` gives it (torchvision
backend): ``BitImageProcessor`` with DINOv2's ``preprocessor_config.json``, ``CLIPImageProcessor`` with CLIP's; for
``open_clip:`` models the inference transform of ``open_clip.create_model_and_transforms(..., pretrained=None)``.
Our side is what a run does: the ``Preprocess`` the backends resolve from those same configs, applied by
``prepare_images`` to image files (read, decode, EXIF, to RGB). The reference gets the file as its user opens it.
Tensors must be equal bit for bit, on images of many shapes and aspect ratios.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipaudit.batches.embed import OK, ImageEncoder, prepare_images
from clipaudit.models import open_clip_backend, resolve_model
from clipaudit.models.hf_processor import family_defaults, preprocess_from_processor_config
from clipaudit.models.preprocess import Preprocess

os.environ["HF_HUB_OFFLINE"] = "1"

# facebook/dinov2-{small,base,large,giant} preprocessor_config.json
DINOV2_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}
# openai/clip-vit-base-patch32 preprocessor_config.json (legacy integer sizes)
CLIP_PROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}
# a crop larger than the resized image: transformers pads with black
PAD_PROCESSOR = {**DINOV2_PROCESSOR, "size": {"shortest_edge": 200}}
# a squashing CLIP-family processor (resize both sides, no crop), bilinear
SQUASH_PROCESSOR = {"size": {"height": 224, "width": 224}, "do_center_crop": False, "resample": 2,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

# (width, height): Flickr8k's odd sizes (500x334: an odd crop remainder), squares, one pixel off a square,
# extreme aspect ratios, single pixels and tiny images
SHAPES = [(500, 334), (334, 500), (500, 375), (500, 333), (640, 427), (383, 257), (1, 1), (1, 2), (2, 1), (3, 5),
          (7, 300), (300, 7), (224, 224), (225, 224), (224, 225), (256, 256), (257, 255), (1000, 10), (10, 1000),
          (13, 17), (64, 48)]
# non-RGB modes, converted on decode: transformers composites alpha on white as the decode does
HF_MODES = ["L", "LA", "RGBA", "P", "P_transparent"]
OPEN_CLIP_MODES = ["L"]

Reference = Callable[[Image.Image], np.ndarray]
FLICKR8K_IMAGES = Path(os.environ.get(
    "CLIPAUDIT_FLICKR8K", Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k")) / "images"


def _image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 7919 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("L", "RGBA"):
        image = image.convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    if mode == "LA":
        image = image.convert("L")
        image = Image.merge("LA", (image, Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))))
    if mode.startswith("P"):
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "P_transparent":
        image.info["transparency"] = 3
    return image


def _write(folder: Path, cases: list[tuple[int, int, str]]) -> list[Path]:
    paths = []
    for width, height, mode in cases:
        buffer = io.BytesIO()
        _image(width, height, mode).save(buffer, format="PNG")
        path = folder / f"{width}x{height}_{mode}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def _as_a_run_does(paths: list[Path], preprocess: Preprocess) -> np.ndarray:
    """Pixels as the embed stage makes them: ``prepare_images`` over the files (read, decode, preprocess)."""
    batch = {"image_id": np.array([p.name for p in paths], dtype=object),
             "uri": np.array([str(p) for p in paths], dtype=object),
             "need_x": np.ones(len(paths), dtype=bool)}
    out = prepare_images(batch, {"x": preprocess}, max_pixels=10**8)
    assert list(out["status"]) == [OK] * len(paths), list(out["detail"])
    return out["pixels_x"]


def _as_a_user_opens(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path))


def _transformers(processor) -> Reference:
    return lambda image: processor(image, return_tensors="pt")["pixel_values"][0].numpy()


def _open_clip_transform(arch: str, pretrained_cfg: dict) -> Reference:
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(
        arch, pretrained=None, image_mean=pretrained_cfg.get("mean"), image_std=pretrained_cfg.get("std"),
        image_interpolation=pretrained_cfg.get("interpolation"),
        image_resize_mode=pretrained_cfg.get("resize_mode"))
    return lambda image: transform(image).numpy()


def _hf_case(name: str) -> tuple[Preprocess, Reference]:
    from transformers import BitImageProcessor, CLIPImageProcessor

    if name == "hf-dinov2":
        return preprocess_from_processor_config(DINOV2_PROCESSOR, "dinov2"), _transformers(
            BitImageProcessor(**DINOV2_PROCESSOR))
    if name == "hf-dinov2-defaults":
        return family_defaults("dinov2"), _transformers(BitImageProcessor(**DINOV2_PROCESSOR))
    if name == "hf-clip":
        return preprocess_from_processor_config(CLIP_PROCESSOR, "clip"), _transformers(
            CLIPImageProcessor(**CLIP_PROCESSOR))
    if name == "hf-pad":
        return preprocess_from_processor_config(PAD_PROCESSOR, "dinov2"), _transformers(
            BitImageProcessor(**PAD_PROCESSOR))
    if name == "hf-clip-defaults":
        return family_defaults("clip"), _transformers(CLIPImageProcessor(**CLIP_PROCESSOR))
    return preprocess_from_processor_config(SQUASH_PROCESSOR, "clip"), _transformers(
        CLIPImageProcessor(**SQUASH_PROCESSOR))


def _open_clip_case(name: str) -> tuple[Preprocess, Reference]:
    arch, tag, overrides = {
        "open_clip-ViT-B-32-openai": ("ViT-B-32", "openai", {}),
        "open_clip-siglip-squash": ("tiny-clip", None, {"tag": ("ViT-B-16-SigLIP", "webli")}),
        "open_clip-bilinear": ("tiny-clip", None, {"interpolation": "bilinear"}),
        "open_clip-longest": ("tiny-clip", None, {"resize_mode": "longest"}),
    }[name]
    model_cfg = open_clip_backend.model_config(f"open_clip:{arch}/x", arch)
    if tag is not None:
        pretrained_cfg = open_clip_backend.pretrained_config(arch, tag)
    elif "tag" in overrides:
        pretrained_cfg = open_clip_backend.pretrained_config(*overrides["tag"])
    else:
        pretrained_cfg = overrides
    return (open_clip_backend.preprocess_from_configs(model_cfg, pretrained_cfg),
            _open_clip_transform(arch, pretrained_cfg))


HF_CASES = ["hf-dinov2", "hf-dinov2-defaults", "hf-pad", "hf-clip", "hf-clip-defaults", "hf-clip-squash"]
OPEN_CLIP_CASES = ["open_clip-ViT-B-32-openai", "open_clip-siglip-squash", "open_clip-bilinear", "open_clip-longest"]


@pytest.mark.parametrize("name", HF_CASES + OPEN_CLIP_CASES)
def test_pixels_identical_to_the_reference_implementation(tmp_path, name):
    hf = name.startswith("hf-")
    ours, reference = _hf_case(name) if hf else _open_clip_case(name)
    assert ours.style == ("transformers" if hf else "torchvision")
    modes = HF_MODES if hf else OPEN_CLIP_MODES
    cases = [(w, h, "RGB") for w, h in SHAPES] + [(w, h, m) for m in modes for w, h in [(500, 334), (7, 30)]]
    paths = _write(tmp_path, cases)
    pixels = _as_a_run_does(paths, ours)
    for path, got in zip(paths, pixels, strict=True):
        expected = reference(_as_a_user_opens(path))
        assert got.shape == expected.shape, path.name
        assert np.array_equal(got, expected), (
            f"{name} {path.name}: max |diff| {np.abs(got - expected).max()}, "
            f"{np.mean(got != expected):.2%} of values differ")


def test_the_two_styles_differ_where_the_crop_remainder_is_odd():
    """500x334 -> 383x256: torchvision rounds the crop offset 79.5 to 80, transformers truncates it to 79."""
    torchvision_style = Preprocess(224, 256, (0.0,) * 3, (1.0,) * 3, "bicubic", kind="rgb")
    transformers_style = Preprocess(224, 256, (0.0,) * 3, (1.0,) * 3, "bicubic", kind="rgb", style="transformers")
    image = _image(500, 334)
    a, b = torchvision_style(image), transformers_style(image)
    assert not np.array_equal(a, b)
    assert np.abs(a[:, :-1].astype(int) - b[:, 1:].astype(int)).max() <= 2, "one column apart, up to resampling"


def test_hf_dinov2_vectors_equal_auto_image_processor_and_auto_model(tmp_path):
    """The whole real path (resolve, prepare_images, ImageEncoder) against AutoImageProcessor + AutoModel on a
    local DINOv2 directory with DINOv2's processor config: the same vectors."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model

    model_dir = tmp_path / "dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                             image_size=224)).save_pretrained(model_dir)
    BitImageProcessor(**DINOV2_PROCESSOR).save_pretrained(model_dir)
    paths = _write(tmp_path, [(500, 334, "RGB"), (334, 500, "RGB"), (640, 427, "RGB"), (7, 300, "RGB"),
                              (1, 1, "RGB"), (500, 375, "RGBA")])

    resolved = resolve_model(f"hf:{model_dir}", "reference")
    batch = {"image_id": np.array([p.name for p in paths], dtype=object),
             "uri": np.array([str(p) for p in paths], dtype=object),
             "need_reference": np.ones(len(paths), dtype=bool)}
    ours = ImageEncoder(resolved, "reference")(prepare_images(batch, {"reference": resolved.preprocess}, 10**8))

    processor = AutoImageProcessor.from_pretrained(model_dir)
    assert type(processor) is BitImageProcessor, "AutoImageProcessor's default backend"
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        inputs = processor([_as_a_user_opens(p) for p in paths], return_tensors="pt")
        expected = model(**inputs).pooler_output.numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    cosines = np.sum(ours["vector_reference"] * expected, axis=1)
    assert cosines.min() >= 1 - 1e-6, cosines
    np.testing.assert_allclose(ours["vector_reference"], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["hf-dinov2", "hf-clip", "open_clip-ViT-B-32-openai"])
def test_real_flickr8k_images_identical(name):
    """The shared Flickr8k sample (JPEG), one image of each size there: the same tensors as the reference."""
    if not FLICKR8K_IMAGES.is_dir():
        pytest.skip(f"the Flickr8k images are not at {FLICKR8K_IMAGES} (set CLIPAUDIT_FLICKR8K to their folder)")
    by_size: dict[tuple[int, int], Path] = {}
    for path in sorted(FLICKR8K_IMAGES.glob("*.jpg")):
        with Image.open(path) as image:
            by_size.setdefault(image.size, path)
    paths = list(by_size.values())
    assert paths, f"no .jpg files in {FLICKR8K_IMAGES}"
    ours, reference = _hf_case(name) if name.startswith("hf-") else _open_clip_case(name)
    for path, got in zip(paths, _as_a_run_does(paths, ours), strict=True):
        assert np.array_equal(got, reference(_as_a_user_opens(path))), path.name
