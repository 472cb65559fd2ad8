"""``timm:`` specs through their real loading code, offline, on a fake Hugging Face hub cache.

The cache holds timm's own tiny test architectures (``test_vit``, ``test_convnext``) with seeded random weights,
saved as timm publishes a model (``save_for_hf``: ``config.json`` + ``model.safetensors``) and laid out as
``huggingface_hub`` lays out a download (tests/hub_cache.py). Our vectors are compared with timm's own pipeline on
the same cache (``create_model(..., pretrained=True)`` + its eval transform), and our preprocessing with timm's
transform bit for bit.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hub_cache import add_repo
from PIL import Image

from clipaudit.models import ModelSpecError, ModelUnavailableError, resolve_model
from clipaudit.models.provenance import provenance

os.environ["HF_HUB_OFFLINE"] = "1"

REVISION = "0123456789abcdef0123456789abcdef01234567"
SIZES = [(200, 150), (150, 200), (160, 160), (97, 311), (40, 30), (513, 512), (1000, 17)]
MODES = {
    "me/vit-squash": {"crop_mode": "squash", "crop_pct": 0.9},
    "me/vit-squash-full": {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear"},
    "me/vit-border": {"crop_mode": "border", "crop_pct": 1.0, "mean": (0.485, 0.456, 0.406)},
    "me/vit-border-scaled": {"crop_mode": "border", "crop_pct": 0.9, "interpolation": "bilinear"},
    "me/vit-center-wide": {"crop_pct": 1.15},
}
"""Hub repos of ``test_vit`` whose config.json asks for each of timm's crop modes (and a resize smaller than the
crop, which center crop pads)."""


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _save(folder, name: str, seed: int, **overlay) -> None:
    """A timm model with seeded random weights (classifier included), saved as timm publishes one."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay or None)
    save_for_hf(model, str(folder), safe_serialization=True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with ``timm/test_vit.r160_in1k``, ``timm/test_convnext.r160_in1k`` (where timm looks for those
    tags), ``me/convnext-bilinear`` (another crop and interpolation, at a pinned revision) and the crop-mode repos."""
    root = tmp_path_factory.mktemp("timm_hub")
    cache = root / "cache"
    _save(root / "vit", "test_vit.r160_in1k", 1)
    add_repo(cache, "timm/test_vit.r160_in1k", root / "vit")
    _save(root / "convnext", "test_convnext.r160_in1k", 2)
    add_repo(cache, "timm/test_convnext.r160_in1k", root / "convnext")
    _save(root / "bilinear", "test_convnext.r160_in1k", 3, interpolation="bilinear", crop_pct=0.8,
          input_size=(3, 128, 128))
    add_repo(cache, "me/convnext-bilinear", root / "bilinear", revision=REVISION)
    for i, (repo, overlay) in enumerate(MODES.items()):
        _save(root / f"mode{i}", "test_vit.r160_in1k", 10 + i, **overlay)
        add_repo(cache, repo, root / f"mode{i}")
    return cache


def _timm_pipeline(name: str, cache, images, **kwargs):
    """timm's own: the model (weights found by timm in ``cache``, None: its default) and its eval transform ->
    (unit rows, pixels)."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=True, num_classes=0, cache_dir=cache and str(cache), **kwargs).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    pixels = torch.stack([transform(image) for image in images])
    with torch.inference_mode():
        features = model(pixels)
        pre_logits = model.forward_head(model.forward_features(pixels), pre_logits=True)
    assert torch.equal(features, pre_logits)
    return torch.nn.functional.normalize(features, dim=-1).numpy(), pixels


@pytest.mark.parametrize("spec,timm_name,dim", [
    ("timm:test_vit.r160_in1k", "test_vit.r160_in1k", 64),
    ("timm:test_convnext.r160_in1k", "test_convnext.r160_in1k", 64),
    ("timm:hf-hub:me/convnext-bilinear", "hf-hub:me/convnext-bilinear", 64),
])
def test_vectors_and_pixels_are_timms_own(hub, spec, timm_name, dim):
    resolved = resolve_model(spec, "reference", cache_dir=str(hub))
    assert not resolved.is_random and resolved.dim == dim and resolved.spec == spec
    images = _images()
    expected, timm_pixels = _timm_pipeline(timm_name, hub, images)
    import torch

    ours = np.stack([resolved.preprocess(image) for image in images])
    for mine, theirs in zip(ours, timm_pixels):
        assert torch.equal(torch.from_numpy(mine), theirs)
    vectors = resolved.load().encode_images(ours)
    assert vectors.dtype == np.float32 and vectors.shape == (len(images), dim)
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def test_preprocessing_differs_by_model(hub):
    vit = resolve_model("timm:test_vit.r160_in1k", "reference", cache_dir=str(hub)).preprocess
    bilinear = resolve_model("timm:hf-hub:me/convnext-bilinear", "reference", cache_dir=str(hub)).preprocess
    assert (vit.image_size, vit.resize_size, vit.interpolation, vit.style) == (160, 168, "bicubic", "torchvision")
    assert (bilinear.image_size, bilinear.resize_size, bilinear.interpolation) == (128, 160, "bilinear")


@pytest.mark.parametrize("repo", list(MODES))
def test_every_crop_mode_gives_timms_pixels_bit_for_bit(hub, repo):
    import timm
    import torch

    resolved = resolve_model(f"timm:hf-hub:{repo}", "reference", cache_dir=str(hub))
    model = timm.create_model(f"hf-hub:{repo}", pretrained=False, cache_dir=str(hub))
    config = timm.data.resolve_data_config({}, model=model)
    assert config["crop_mode"] == MODES[repo].get("crop_mode", "center")
    transform = timm.data.create_transform(**config, is_training=False)
    expected_style = "torchvision" if repo in ("me/vit-squash-full", "me/vit-center-wide") else "timm"
    assert resolved.preprocess.style == expected_style
    for image in _images():
        ours = resolved.preprocess(image)
        assert ours.dtype == np.float32 and ours.shape == resolved.preprocess.output_shape
        assert torch.equal(torch.from_numpy(ours), transform(image)), (repo, image.size)


def test_the_default_cache_is_where_timm_looks(hub, monkeypatch):
    """Without ``models.cache_dir``: huggingface_hub's cache (HF_HUB_CACHE), as timm's own download finds it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    resolved = resolve_model("timm:test_vit.r160_in1k", "reference")
    assert resolved.cache_dir is None and not resolved.is_random
    assert provenance(resolved)["weights"][0].startswith(str(hub))
    images = _images()[:2]
    expected, _ = _timm_pipeline("test_vit.r160_in1k", None, images)
    vectors = resolved.load().encode_images(np.stack([resolved.preprocess(image) for image in images]))
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def test_provenance_names_the_revision_and_the_weights_hash(hub):
    resolved = resolve_model("timm:hf-hub:me/convnext-bilinear", "reference", cache_dir=str(hub))
    found = provenance(resolved)
    snapshot = hub / "models--me--convnext-bilinear" / "snapshots" / REVISION
    assert found["backend"] == "timm" and found["architecture"] == "test_convnext"
    assert found["source"] == "hf-hub:me/convnext-bilinear" and found["revision"] == REVISION
    assert found["weights"] == [str(snapshot / "model.safetensors")]
    assert found["weights_sha256"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert not found["random"] and not found["fallback"]
    named = provenance(resolve_model("timm:test_vit.r160_in1k", "reference", cache_dir=str(hub)))
    assert named["source"] == "timm/test_vit.r160_in1k" and named["architecture"] == "test_vit"
    assert named["revision"] and named["weights"][0].endswith("model.safetensors")


def test_a_pinned_revision(hub):
    resolved = resolve_model(f"timm:hf-hub:me/convnext-bilinear@{REVISION}", "reference", cache_dir=str(hub))
    assert provenance(resolved)["revision"] == REVISION
    with pytest.raises(ModelUnavailableError, match="not in the cache"):
        resolve_model(f"timm:hf-hub:me/convnext-bilinear@{'f' * 40}", "reference", cache_dir=str(hub))


def test_absent_weights_are_unavailable_and_fall_back_to_tiny(hub):
    with pytest.raises(ModelUnavailableError, match="hf download timm/test_resnet.r160_in1k"):
        resolve_model("timm:test_resnet.r160_in1k", "reference", cache_dir=str(hub))
    with pytest.raises(ModelUnavailableError, match="me/absent"):
        resolve_model("timm:hf-hub:me/absent", "reference", cache_dir=str(hub))
    for spec in ("timm:test_resnet.r160_in1k", "timm:hf-hub:me/absent"):
        resolved = resolve_model(spec, "reference", fallback="tiny", cache_dir=str(hub))
        assert resolved.spec == "tiny-dino" and resolved.requested_spec == spec and resolved.is_random


def test_the_clip_role_is_refused(hub):
    for fallback in ("none", "tiny"):
        with pytest.raises(ModelSpecError, match="no text tower"):
            resolve_model("timm:test_vit.r160_in1k", "clip", fallback=fallback, cache_dir=str(hub))
    resolved = resolve_model("timm:test_vit.r160_in1k", "reference", cache_dir=str(hub))
    with pytest.raises(TypeError, match="image-only"):
        resolved.load().encode_texts(["a dog"])


def test_random_weights_are_seeded():
    resolved = resolve_model("timm:test_convnext.r160_in1k/random", "reference")
    assert resolved.is_random and resolved.dim == 64
    pixels = np.stack([resolved.preprocess(image) for image in _images()[:3]])
    first, second = resolved.load().encode_images(pixels), resolved.load().encode_images(pixels)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    found = provenance(resolved)
    assert found["source"] == "random (seeded)" and found["weights"] == [] and found["weights_sha256"] is None


def test_a_local_weights_file(tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(5)
    trained = timm.create_model("test_convnext.r160_in1k", pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file(trained.state_dict(), str(path))
    resolved = resolve_model(f"timm:test_convnext.r160_in1k/{path}", "reference")
    assert resolved.spec == f"timm:test_convnext.r160_in1k/{path}" and not resolved.is_random
    images = _images()[:3]
    reference = timm.create_model("test_convnext.r160_in1k", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(path)}).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference), is_training=False)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(reference(torch.stack([transform(i) for i in images])), dim=-1)
    pixels = np.stack([resolved.preprocess(image) for image in images])
    np.testing.assert_allclose(resolved.load().encode_images(pixels), expected.numpy(), rtol=0, atol=1e-6)
    found = provenance(resolved)
    assert found["weights"] == [str(path)] and found["revision"] is None
    assert found["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    relative = resolve_model("timm:test_convnext.r160_in1k/weights.safetensors", "reference")
    np.testing.assert_allclose(relative.load().encode_images(pixels), expected.numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model("timm:test_convnext.r160_in1k/missing.safetensors", "reference")


@pytest.mark.parametrize("spec,match", [
    ("timm:no_such_architecture_xyz", "no architecture"),
    ("timm:test_vit.no_such_tag", "no pretrained tag"),
    ("timm:test_vit/latest", "neither 'random' nor an existing weights file"),
    ("timm:test_vit/", "expected one of"),
    ("timm:hf-hub:not-a-repo", "timm:hf-hub:ORG/NAME"),
    ("timm:hf-hub:org/name/extra", "timm:hf-hub:ORG/NAME"),
    ("timm:qwen3_vit_88m_enc/random", "pooled vector"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        resolve_model(spec, "reference")
