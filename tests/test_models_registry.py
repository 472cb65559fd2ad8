"""The registry: spec parsing, tiny models, fallback, unavailable weights, light imports."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clipaudit.models import (
    ModelSpecError,
    ModelUnavailableError,
    ResolvedModel,
    parse_spec,
    resolve_model,
)

os.environ["HF_HUB_OFFLINE"] = "1"

TEXTS = ["a dog on a beach", "two cats", "an empty street at night"]


def _images(pre, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(n)]
    return np.stack([pre(im) for im in images])


@pytest.fixture(scope="module")
def tiny_clip():
    return resolve_model("tiny-clip", "clip")


@pytest.fixture(scope="module")
def tiny_clip_loaded(tiny_clip):
    return tiny_clip.load()


def test_tiny_clip_gives_unit_float32_vectors(tiny_clip, tiny_clip_loaded):
    model = tiny_clip_loaded
    assert tiny_clip.is_random and tiny_clip.spec == tiny_clip.requested_spec == "tiny-clip"
    assert tiny_clip.preprocess.image_size == 64 and model.dim == tiny_clip.dim == 64
    images = model.encode_images(_images(tiny_clip.preprocess))
    texts = model.encode_texts(TEXTS)
    for out, n in ((images, 4), (texts, 3)):
        assert out.shape == (n, 64) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(model.logit_scale) and model.logit_scale > 0
    assert model.encode_images(np.zeros((0, 3, 64, 64), np.float32)).shape == (0, 64)
    assert model.encode_texts([]).shape == (0, 64)


def test_tiny_clip_is_identical_across_loads_and_ignores_the_global_rng(tiny_clip, tiny_clip_loaded):
    import torch

    pixels = _images(tiny_clip.preprocess)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = pickle.loads(pickle.dumps(tiny_clip)).load()
    assert torch.equal(state, torch.get_rng_state()), "load must not consume the caller's RNG"
    np.testing.assert_array_equal(tiny_clip_loaded.encode_images(pixels), again.encode_images(pixels))
    np.testing.assert_array_equal(tiny_clip_loaded.encode_texts(TEXTS), again.encode_texts(TEXTS))


def test_tiny_clip_is_identical_in_another_process(tiny_clip, tiny_clip_loaded):
    code = ("import numpy as np, sys; from clipaudit.models import resolve_model; "
            "m = resolve_model('tiny-clip', 'clip').load(); "
            "sys.stdout.buffer.write(m.encode_texts(['a dog on a beach', 'two cats']).tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120).stdout
    theirs = np.frombuffer(out, dtype=np.float32).reshape(2, 64)
    np.testing.assert_array_equal(theirs, tiny_clip_loaded.encode_texts(TEXTS[:2]))


def test_tiny_dino_is_identical_across_loads():
    resolved = resolve_model("tiny-dino", "reference")
    assert resolved.is_random and resolved.preprocess.resize_size == 73 and resolved.preprocess.image_size == 64
    pixels = _images(resolved.preprocess)
    a, b = resolved.load(), resolved.load()
    out = a.encode_images(pixels)
    assert out.shape == (4, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out, b.encode_images(pixels))
    with pytest.raises(TypeError, match="image-only"):
        a.encode_texts(["x"])


def test_wrong_batch_shape_is_a_clear_error(tiny_clip_loaded):
    with pytest.raises(ValueError, match="tiny-clip: expected a batch of shape"):
        tiny_clip_loaded.encode_images(np.zeros((2, 3, 32, 32), np.float32))


@pytest.mark.parametrize("spec", ["", "  ", "clip", "ViT-B-32/openai", "open_clip:", "open_clip:ViT-B-32",
                                  "open_clip:ViT-B-32/", "open_clip:/openai", "hf:", "python:", "python:mod",
                                  "python:mod:", "python:1bad.mod:f", "hf-random:resnet50", "tiny-vit",
                                  "open_clip:hf-hub:org/x/y"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ModelSpecError, match="bad model spec"):
        resolve_model(spec, "reference")


def test_unknown_open_clip_architecture_and_tag():
    with pytest.raises(ModelSpecError, match="no architecture 'ViT-Q-99'"):
        resolve_model("open_clip:ViT-Q-99/openai", "clip")
    with pytest.raises(ModelSpecError, match=r"neither a pretrained tag of ViT-B-32.*laion2b_s34b_b79k"):
        resolve_model("open_clip:ViT-B-32/no_such_tag", "clip")


def test_role_mismatches_and_bad_arguments():
    with pytest.raises(ModelSpecError, match="no text tower"):
        resolve_model("tiny-dino", "clip")
    with pytest.raises(ModelSpecError, match="no text tower"):
        resolve_model("hf-random:dinov2-small", "clip")
    with pytest.raises(ValueError, match="role"):
        resolve_model("tiny-clip", "teacher")
    with pytest.raises(ValueError, match="fallback"):
        resolve_model("tiny-clip", "clip", fallback="yes")


def test_parse_spec():
    assert parse_spec("open_clip:ViT-B-32//abs/m.pt").body == "ViT-B-32//abs/m.pt"
    assert parse_spec(" hf:facebook/dinov2-base ").kind == "hf"
    assert parse_spec("tiny-dino").kind == "tiny"


@pytest.mark.parametrize("spec,role", [("open_clip:ViT-B-32/openai", "clip"),
                                       ("open_clip:ViT-B-32/laion2b_s34b_b79k", "clip"),
                                       ("hf:facebook/dinov2-base", "reference"),
                                       ("hf:openai/clip-vit-base-patch32", "clip")])
def test_unavailable_weights_raise_quickly_with_help(spec, role, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model(spec, role, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert repr(spec) in message and info.value.spec == spec
    for needle in ("HF_HUB_OFFLINE", "open_clip:ARCH//path/to/checkpoint.pt", "HF_HOME", "models.cache_dir",
                   "models.fallback: tiny", "hf download"):
        assert needle in message


@pytest.mark.parametrize("spec,role,tiny", [("open_clip:ViT-B-32/openai", "clip", "tiny-clip"),
                                            ("hf:facebook/dinov2-base", "reference", "tiny-dino")])
def test_fallback_tiny(spec, role, tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="clipaudit.models"):
        resolved = resolve_model(spec, role, fallback="tiny")
    assert (resolved.spec, resolved.requested_spec, resolved.role, resolved.is_random) == (tiny, spec, role, True)
    assert any("RANDOM" in r.getMessage() and "MEANINGLESS" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert resolved.load().encode_images(_images(resolved.preprocess, 2)).shape == (2, 64)


def test_fallback_does_not_hide_bad_specs():
    with pytest.raises(ModelSpecError):
        resolve_model("open_clip:ViT-Q-99/openai", "clip", fallback="tiny")


def test_missing_checkpoint_file_is_unavailable_and_can_fall_back(tmp_path):
    spec = f"open_clip:ViT-B-32/{tmp_path}/nope.pt"
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model(spec, "clip")
    assert resolve_model(spec, "clip", fallback="tiny").spec == "tiny-clip"


@pytest.fixture()
def silent_hub(monkeypatch):
    """A 'Hub' on 127.0.0.1 that accepts connections and never answers, with offline mode off."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("CLIPAUDIT_HUB_PROBE_TIMEOUT", "0.5")
    yield
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("spec,role", [("open_clip:ViT-B-32/openai", "clip"), ("hf:facebook/dinov2-base", "reference")])
def test_a_hub_that_never_answers_does_not_hang_resolve(silent_hub, spec, role, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"http://127\.0\.0\.1:\d+ (cannot be reached|within)"):
        resolve_model(spec, role, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_random_architectures_resolve_without_weights():
    vit = resolve_model("open_clip:ViT-B-32/random", "clip")
    assert vit.is_random and vit.dim == 512 and vit.preprocess.image_size == 224
    dino = resolve_model("hf-random:dinov2-small", "reference")
    assert dino.is_random and dino.dim == 384
    assert (dino.preprocess.image_size, dino.preprocess.resize_size) == (224, 256)
    clip = resolve_model("hf-random:openai/clip-vit-base-patch16", "clip")
    assert clip.is_random and clip.dim == 512


def test_resolved_models_are_picklable_hashable_values():
    from clipaudit.models import LoadedModel

    for spec, role in (("tiny-clip", "clip"), ("tiny-dino", "reference"), ("hf-random:dinov2-small", "reference")):
        resolved = resolve_model(spec, role)
        again = pickle.loads(pickle.dumps(resolved))
        assert again == resolved and hash(again) == hash(resolved)
    assert isinstance(resolve_model("tiny-dino", "reference").load(), LoadedModel)


def test_cuda_load_runs_fp16_and_returns_float32():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    resolved = resolve_model("tiny-clip", "clip")
    model = resolved.load("cuda")
    assert next(model._model.parameters()).dtype == torch.float16
    cpu = resolved.load("cpu")
    pixels = _images(resolved.preprocess)
    out = model.encode_images(pixels)
    assert out.dtype == np.float32 and out.shape == (4, 64)
    np.testing.assert_allclose(out, cpu.encode_images(pixels), atol=2e-2)
    np.testing.assert_allclose(model.encode_texts(TEXTS), cpu.encode_texts(TEXTS), atol=2e-2)


def test_resolved_model_without_target_cannot_load():
    from clipaudit.models import Preprocess

    bare = ResolvedModel("x", "x", "clip", Preprocess(8, 8, (0, 0, 0), (1, 1, 1), "bicubic"), True)
    with pytest.raises(TypeError, match="resolve_model"):
        bare.load()


def test_importing_the_models_package_stays_light():
    code = ("import sys, clipaudit.models, clipaudit.models.registry, clipaudit.models.open_clip_backend, "
            "clipaudit.models.hf_backend, clipaudit.models.plugin, clipaudit.models.tiny, clipaudit.models.hub; "
            "heavy = [m for m in ('torch', 'open_clip', 'transformers', 'torchvision') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""
