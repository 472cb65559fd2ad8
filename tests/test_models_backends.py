"""Backends through their real loading code: hf: local dirs and a local hub cache, open_clip checkpoints,
python: plug-ins. Everything is built here, offline; nothing is fetched from a hub."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from PIL import Image

from clipaudit.models import (
    ModelSpecError,
    ModelUnavailableError,
    open_clip_backend,
    resolve_model,
)
from clipaudit.models.hf_backend import build_clip_tokenizer_from_open_clip

os.environ["HF_HUB_OFFLINE"] = "1"

TEXTS = ["a photo of a dog", "a red car parked on the street"]


def _batch(pre, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack([pre(Image.fromarray(rng.integers(0, 256, (60, 45 + i, 3), dtype=np.uint8))) for i in range(n)])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def clip_tokenizer():
    return build_clip_tokenizer_from_open_clip()


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, clip_tokenizer):
    """A tiny transformers CLIPModel saved with save_pretrained, with a real (BPE) tokenizer and a processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    clip_tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _save_dino(directory) -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                             image_size=64)).save_pretrained(directory)


def test_open_clip_bpe_tokenizer_matches_open_clip(clip_tokenizer):
    import open_clip

    assert len(clip_tokenizer) == 49408
    ours = clip_tokenizer(TEXTS, padding="max_length", max_length=77, return_tensors="np")
    theirs = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    mask = ours["attention_mask"].astype(bool)
    np.testing.assert_array_equal(mask, theirs != 0)
    np.testing.assert_array_equal(ours["input_ids"][mask], theirs[mask])


def test_hf_clip_from_local_dir(hf_clip_dir):
    import torch
    from transformers import CLIPModel

    resolved = resolve_model(f"hf:{hf_clip_dir}", "clip")
    assert not resolved.is_random and resolved.dim == 16
    assert (resolved.preprocess.image_size, resolved.preprocess.resize_size) == (32, 32)
    model = resolved.load()
    assert (model.dim, model.device) == (16, "cpu")
    pixels = _batch(resolved.preprocess)
    images, texts = model.encode_images(pixels), model.encode_texts(TEXTS)
    assert images.shape == (3, 16) and texts.shape == (2, 16) and images.dtype == texts.dtype == np.float32
    reference = CLIPModel.from_pretrained(hf_clip_dir).eval()
    with torch.inference_mode():
        expected = reference.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    np.testing.assert_allclose(images, _unit(expected), atol=1e-5)
    assert model.logit_scale == pytest.approx(float(reference.logit_scale.detach().exp()), rel=1e-6)


def test_broken_tokenizer_is_an_error_at_resolve_and_at_load(tmp_path, hf_clip_dir):
    import shutil

    from transformers import CLIPTokenizer

    good = tmp_path / "clip"
    shutil.copytree(hf_clip_dir, good)
    resolved = resolve_model(f"hf:{good}", "clip")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (good / name).unlink(missing_ok=True)
    CLIPTokenizer().save_pretrained(good)
    with pytest.raises(ModelUnavailableError, match=r"only \d+ tokens") as info:
        resolve_model(f"hf:{good}", "clip")
    assert f"hf:{good}" in str(info.value)
    with pytest.raises(ModelUnavailableError, match=r"only \d+ tokens"):
        resolved.load()
    assert resolve_model(f"hf:{good}", "reference").dim == 16, "an image-only use needs no tokenizer"


def test_hf_dir_without_tokenizer_or_weights(tmp_path, hf_clip_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_clip_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    with pytest.raises(ModelUnavailableError, match="no tokenizer files"):
        resolve_model(f"hf:{bare}", "clip")
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="no weights"):
        resolve_model(f"hf:{bare}", "reference")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model(f"hf:{tmp_path}/missing/dir", "reference")


def test_hf_dinov2_from_local_dir_is_the_layernormed_cls_token(tmp_path):
    import torch
    from transformers import Dinov2Model

    _save_dino(tmp_path)
    resolved = resolve_model(f"hf:{tmp_path}", "reference")
    assert (resolved.preprocess.image_size, resolved.preprocess.resize_size) == (224, 256), "DINOv2 defaults"
    assert resolved.preprocess.mean == (0.485, 0.456, 0.406) and resolved.dim == 32
    pixels = _batch(resolved.preprocess, 2)
    out = resolved.load().encode_images(pixels)
    reference = Dinov2Model.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        result = reference(pixel_values=torch.from_numpy(pixels))
        cls = reference.layernorm(reference.encoder(reference.embeddings(torch.from_numpy(pixels)))
                                  .last_hidden_state)[:, 0]
    np.testing.assert_allclose(result.pooler_output.numpy(), cls.numpy(), atol=1e-6)
    np.testing.assert_allclose(out, _unit(cls.numpy()), atol=1e-5)
    with pytest.raises(ModelSpecError, match="no text tower"):
        resolve_model(f"hf:{tmp_path}", "clip")


def test_hf_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSpecError, match="model_type 'bert'"):
        resolve_model(f"hf:{tmp_path}", "reference")


def test_hf_hub_id_from_a_local_hub_cache(tmp_path):
    """``hf:ORG/NAME`` found in a hub cache (``models.cache_dir``) loads with local files only."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--facebook--dinov2-base"
    _save_dino(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    resolved = resolve_model("hf:facebook/dinov2-base", "reference", cache_dir=str(tmp_path))
    assert resolved.spec == "hf:facebook/dinov2-base" and not resolved.is_random and resolved.dim == 32
    assert resolved.load().encode_images(_batch(resolved.preprocess, 2)).shape == (2, 32)


@pytest.fixture(scope="module")
def test_arch(tmp_path_factory):
    """The tiny CLIP config registered with open_clip under another architecture name."""
    import open_clip

    from clipaudit.models import tiny

    folder = tmp_path_factory.mktemp("arch")
    (folder / "test-arch.json").write_text(tiny.config_path("tiny-clip").read_text())
    open_clip.add_model_config(folder / "test-arch.json")
    return "test-arch"


def test_open_clip_local_checkpoint(tmp_path, monkeypatch, test_arch):
    import open_clip
    import torch

    torch.manual_seed(42)
    trained = open_clip.create_model(test_arch, pretrained=None).eval()
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(trained.state_dict(), checkpoint)
    resolved = resolve_model(f"open_clip:{test_arch}/{checkpoint}", "clip")
    assert resolved.spec == f"open_clip:{test_arch}//" + str(checkpoint).lstrip("/")
    assert not resolved.is_random and resolved.dim == 64 and resolved.preprocess.image_size == 64
    model = resolved.load()
    pixels = _batch(resolved.preprocess)
    with torch.inference_mode():
        expected_images = trained.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        expected_texts = trained.encode_text(open_clip.get_tokenizer(test_arch)(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(model.encode_images(pixels), expected_images, atol=1e-5)
    np.testing.assert_allclose(model.encode_texts(TEXTS), expected_texts, atol=1e-5)
    monkeypatch.chdir(tmp_path)
    relative = resolve_model(f"open_clip:{test_arch}/ckpt.pt", "clip")
    np.testing.assert_allclose(relative.load().encode_images(pixels), expected_images, atol=1e-5)


def test_open_clip_named_tag_found_in_the_cache_and_built_with_quick_gelu(tmp_path, monkeypatch):
    revision = "0" * 40
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "open_clip_model.safetensors").write_bytes(b"placeholder")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    resolved = resolve_model("open_clip:ViT-B-32/openai", "clip", cache_dir=str(tmp_path))
    pre = resolved.preprocess
    assert (pre.image_size, pre.resize_size, pre.interpolation, pre.resize_mode) == (224, 224, "bicubic", "shortest")
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073) and resolved.dim == 512 and not resolved.is_random
    seen = {}

    def fake_build(arch, pretrained, *, cache_dir=None, quick_gelu=False):
        seen.update(arch=arch, pretrained=pretrained, quick_gelu=quick_gelu)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip_backend, "build", fake_build)
    with pytest.raises(RuntimeError, match="stop here"):
        resolved.load()
    assert seen == {"arch": "ViT-B-32", "quick_gelu": True,
                    "pretrained": str(repo / "snapshots" / revision / "open_clip_model.safetensors")}


PLUGIN = '''
import numpy as np


class Model:
    """A plug-in model: mean colour + size features, not normalised; records what it was given."""

    image_size = 48

    def __init__(self, device="cpu"):
        self.device = device
        self.logit_scale = 50.0
        self.seen = []

    def encode_images(self, images):
        self.seen.extend((im.mode, im.size) for im in images)
        return [[*np.asarray(im, dtype=np.float32).mean(axis=(0, 1)), 3.0] for im in images]

    def encode_texts(self, texts):
        return np.array([[len(t), 1.0, 2.0, 3.0] for t in texts])


def image_only():
    class ImageOnly:
        def encode_images(self, images):
            return np.ones((len(images), 2))

    return ImageOnly()


def no_methods():
    return object()
'''


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_plugin_mod"


def test_python_plugin(plugin_module):
    resolved = resolve_model(f"python:{plugin_module}:Model", "clip")
    pre = resolved.preprocess
    assert (pre.kind, pre.image_size, pre.output_shape) == ("rgb", 48, (48, 48, 3)) and not resolved.is_random
    model = resolved.load("cpu")
    assert model.dim == 4 and model.logit_scale == 50.0 and model._obj.device == "cpu"
    pixels = _batch(pre)
    assert pixels.dtype == np.uint8
    images = model.encode_images(pixels)
    assert images.shape == (3, 4) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-6)
    assert set(model._obj.seen) == {("RGB", (48, 48))}
    np.testing.assert_allclose(model.encode_texts(["ab"]), _unit(np.array([[2.0, 1.0, 2.0, 3.0]])), atol=1e-6)


def test_python_plugin_errors(plugin_module):
    assert resolve_model(f"python:{plugin_module}:image_only", "reference").load().dim == 2
    with pytest.raises(ModelSpecError, match="lacks encode_texts"):
        resolve_model(f"python:{plugin_module}:image_only", "clip").load()
    with pytest.raises(ModelSpecError, match="lacks encode_images"):
        resolve_model(f"python:{plugin_module}:no_methods", "reference").load()
    with pytest.raises(ModelSpecError, match="has no attribute 'missing'"):
        resolve_model(f"python:{plugin_module}:missing", "reference")
    with pytest.raises(ModelSpecError, match="cannot import module 'no_such_module_xyz'"):
        resolve_model("python:no_such_module_xyz:make", "reference")


def test_hf_random_dinov2_small_is_the_real_architecture():
    resolved = resolve_model("hf-random:dinov2-small", "reference")
    model = resolved.load()
    params = sum(p.numel() for p in model._model.parameters())
    assert model.dim == 384 and 21_000_000 < params < 23_000_000
    out = model.encode_images(_batch(resolved.preprocess, 1))
    assert out.shape == (1, 384)
    np.testing.assert_array_equal(out, resolved.load().encode_images(_batch(resolved.preprocess, 1)))
