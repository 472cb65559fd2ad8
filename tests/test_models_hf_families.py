"""Every transformers family of ``hf:`` against the library's own pipeline, on a fake hub cache.

Each model is the real architecture with seeded random weights, saved with its processor (and tokenizer) and laid out as
the hub lays out a download. For each: the pixels are ``AutoImageProcessor``'s exactly, the image vectors those of
``AutoModel`` on them (pooled as the family pools), the token ids those of the tokenizer called as the family's
processor is documented to be called, the text vectors those of ``get_text_features``, and provenance names the snapshot
revision and the weights' SHA-256. SigLIP comes twice: SigLIP 1 with its own sentencepiece ``SiglipTokenizer``
(``spiece.model`` alone, checked against ``SiglipProcessor``), SigLIP 2 with a Gemma one. ALIGN is checked against
``AlignProcessor`` and ``AlignModel`` themselves (pixels, token ids, vectors, logits), and every
``EfficientNetImageProcessor`` configuration against its own pixels."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from family_checkpoints import DUAL_ENCODERS, IMAGE_ENCODERS
from hub_cache import ALIGN_TEMPERATURE, TINY_ALIGN_PROCESSOR, add_repo, build_align
from PIL import Image

from clipaudit.models import ModelSpecError, ModelUnavailableError, resolve_model
from clipaudit.models.provenance import provenance

os.environ["HF_HUB_OFFLINE"] = "1"

TEXTS = ["A Photo of a Dog", "two red squares on the left of a blue circle", "x", "A dog, running!"]
def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            [(40, 52), (61, 33), (32, 32), (90, 70)]]


ALIGN_REPO = "test-org/align"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Every model above in one fake hub cache, as ``test-org/<name>``."""
    root = tmp_path_factory.mktemp("hub")
    builders = {**{name.split("-")[0]: spec[0] for name, spec in IMAGE_ENCODERS.items()}, **DUAL_ENCODERS,
                "align": build_align}
    for name, build in builders.items():
        files = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        build(files)
        add_repo(root / "cache", f"test-org/{name}", files)
    return root / "cache"


def _library_pixels(snapshot: Path, images: list[Image.Image]) -> torch.Tensor:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(snapshot)(images, return_tensors="pt").pixel_values


def _same_pixels(resolved, snapshot: Path, name: str) -> tuple[np.ndarray, torch.Tensor]:
    """Our pixels of the test images and the library's (``AutoImageProcessor`` of ``snapshot``), asserted equal."""
    images = _images()
    ours = np.stack([resolved.preprocess(image) for image in images])
    theirs = _library_pixels(snapshot, images)
    assert torch.equal(torch.from_numpy(ours), theirs), name
    return ours, theirs


def _snapshot(cache: Path, repo: str) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    return folder / "snapshots" / (folder / "refs" / "main").read_text()


@pytest.mark.parametrize("name", list(IMAGE_ENCODERS))
def test_image_encoders_equal_auto_model_on_auto_image_processor(cache, name):
    from transformers import AutoModel

    _, suffix, pool = IMAGE_ENCODERS[name]
    repo = f"test-org/{name.split('-')[0]}"
    resolved = resolve_model(f"hf:{repo}{suffix}", "reference", cache_dir=str(cache))
    snapshot = _snapshot(cache, repo)
    ours, theirs = _same_pixels(resolved, snapshot, name)
    vectors = resolved.load("cpu").encode_images(ours)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(pool(AutoModel.from_pretrained(snapshot)(pixel_values=theirs)),
                                                  dim=-1).numpy()
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    facts = provenance(resolved)
    weights = snapshot / "model.safetensors"
    assert facts["revision"] == snapshot.name and facts["source"] == repo
    assert facts["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(DUAL_ENCODERS))
def test_dual_encoders_equal_the_library_on_pixels_tokens_and_vectors(cache, name):
    from transformers import AutoModel, AutoTokenizer

    repo = f"test-org/{name}"
    resolved = resolve_model(f"hf:{repo}", "clip", cache_dir=str(cache))
    snapshot = _snapshot(cache, repo)
    ours, theirs = _same_pixels(resolved, snapshot, name)
    loaded = resolved.load("cpu")
    library = AutoModel.from_pretrained(snapshot)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    if name == "siglip2":
        tokens = tokenizer([t.lower() for t in TEXTS], padding="max_length", max_length=64, truncation=True,
                           return_tensors="pt")
        assert tokens["input_ids"].shape[1] == 64
    elif name == "siglip":
        from transformers import SiglipProcessor

        tokens = SiglipProcessor.from_pretrained(snapshot)(text=TEXTS, padding="max_length", return_tensors="pt")
        assert type(tokenizer).__name__ == "SiglipTokenizer" and tokens["input_ids"].shape[1] == 64
    else:
        tokens = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    mine = loaded.tokenize(TEXTS)
    assert torch.equal(mine["input_ids"], tokens["input_ids"])
    with torch.inference_mode():
        image_ref = library.get_image_features(pixel_values=theirs)
        text_ref = library.get_text_features(**{k: v for k, v in tokens.items()
                                                if k in ("input_ids", "attention_mask")})
    unit = lambda x: torch.nn.functional.normalize(getattr(x, "pooler_output", x), dim=-1).numpy()  # noqa: E731
    np.testing.assert_allclose(loaded.encode_images(ours), unit(image_ref), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(TEXTS), unit(text_ref), atol=1e-6)
    assert loaded.logit_scale == pytest.approx(float(library.logit_scale.detach().exp()))
    if name.startswith("siglip"):
        assert loaded.logit_bias == pytest.approx(float(library.logit_bias.detach()))
    else:
        assert np.isnan(loaded.logit_bias)


def test_unknown_vision_models_need_a_stated_pooling_and_dual_encoders_refuse_one(cache):
    with pytest.raises(ModelSpecError, match="state how its output becomes one vector"):
        resolve_model("hf:test-org/vit", "reference", cache_dir=str(cache))
    with pytest.raises(ModelSpecError, match="must be one of pooler, cls, mean"):
        resolve_model("hf:test-org/vit#max", "reference", cache_dir=str(cache))
    with pytest.raises(ModelSpecError, match="no '#pooling' applies"):
        resolve_model("hf:test-org/clip#cls", "reference", cache_dir=str(cache))
    with pytest.raises(ModelSpecError, match="has no text tower"):
        resolve_model("hf:test-org/dinov3_vit", "clip", cache_dir=str(cache))


def test_a_sentencepiece_tokenizer_is_counted_and_a_broken_one_refused(cache, tmp_path):
    """SigLIP 1 ships ``spiece.model`` alone: its vocabulary is read from it before loading, and a file that is not
    a sentencepiece model is refused at resolve, naming the directory, instead of failing in the first forward."""
    import shutil

    from clipaudit.models.hf_backend import tokenizer_vocab_size

    snapshot = _snapshot(cache, "test-org/siglip")
    assert tokenizer_vocab_size(snapshot) == 2000
    broken = tmp_path / "siglip"
    shutil.copytree(snapshot, broken)
    (broken / "spiece.model").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelUnavailableError, match=rf"the tokenizer in {broken} has only 0 tokens"):
        resolve_model(f"hf:{broken}", "clip")
    assert resolve_model(f"hf:{broken}", "reference").dim == 32, "an image-only use needs no tokenizer"


def test_siglip2_naflex_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "naflex").mkdir()
    (tmp_path / "naflex" / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(ModelSpecError, match="fixed-resolution SigLIP 2"):
        resolve_model(f"hf:{tmp_path / 'naflex'}", "clip")


def test_sigmoid_models_score_each_caption_with_their_bias():
    from clipaudit.tcac_scoring import pool_probabilities

    images = np.array([[1.0, 0.0], [0.6, 0.8]])
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    softmax = pool_probabilities(images, pool, 10.0)
    assert np.allclose(softmax.sum(axis=1), 1.0)
    sigmoid = pool_probabilities(images, pool, 10.0, -5.0)
    assert np.allclose(sigmoid, 1 / (1 + np.exp(-(10.0 * images @ pool.T - 5.0))))
    assert (np.argsort(-sigmoid, axis=1) == np.argsort(-softmax, axis=1)).all()


def test_models_check_passes_every_family(cache):
    from clipaudit.model_check import check_spec

    specs = {f"hf:test-org/{name}": "clip" for name in [*DUAL_ENCODERS, "align"]}
    specs.update({f"hf:test-org/{name.split('-')[0]}{suffix}": "reference"
                  for name, (_, suffix, _) in IMAGE_ENCODERS.items()})
    for spec, role in specs.items():
        result = check_spec(spec, "auto", cache_dir=str(cache))
        assert result["ok"] and result["role"] == role, (spec, result["problems"])
        assert result["provenance"]["revision"] and result["provenance"]["weights_sha256"]


def _unit(features: Any) -> np.ndarray:
    return torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1).numpy()


def test_align_equals_align_processor_and_align_model(cache):
    from transformers import AlignModel, AlignProcessor

    resolved = resolve_model(f"hf:{ALIGN_REPO}", "clip", cache_dir=str(cache))
    snapshot = _snapshot(cache, ALIGN_REPO)
    pre = resolved.preprocess
    assert (pre.style, pre.resize_mode, pre.resize_size, pre.image_size) == ("efficientnet", "squash", 40, 32)
    assert (pre.rescale_offset, pre.normalize, pre.include_top, pre.interpolation) == (True, False, False, "bilinear")
    images = _images()
    inputs = AlignProcessor.from_pretrained(snapshot)(images=images, text=TEXTS, return_tensors="pt")
    ours = np.stack([pre(image) for image in images])
    assert torch.equal(torch.from_numpy(ours), inputs["pixel_values"])
    assert ours.min() >= -1.0 and ours.max() <= 1.0 and ours.min() < -0.9 and ours.max() > 0.9
    loaded = resolved.load("cpu")
    tokens = loaded.tokenize(TEXTS)
    assert tokens["input_ids"].shape == (len(TEXTS), 64)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(tokens[key], inputs[key]), key
    library = AlignModel.from_pretrained(snapshot)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with torch.inference_mode():
        image_ref = library.get_image_features(pixel_values=inputs["pixel_values"])
        text_ref = library.get_text_features(**text_inputs)
        forward = library(**inputs)
    image_vectors, text_vectors = loaded.encode_images(ours), loaded.encode_texts(TEXTS)
    assert image_vectors.shape == (len(images), 16) and text_vectors.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(image_vectors, _unit(image_ref), atol=1e-6)
    np.testing.assert_allclose(text_vectors, _unit(text_ref), atol=1e-6)
    np.testing.assert_allclose(image_vectors, forward.image_embeds.numpy(), atol=1e-6)
    np.testing.assert_allclose(text_vectors, forward.text_embeds.numpy(), atol=1e-6)
    assert loaded.logit_scale == pytest.approx(1 / ALIGN_TEMPERATURE, rel=1e-6)
    assert np.isnan(loaded.logit_bias)
    # 1e-5, not bit for bit: AlignModel divides its cosines by the float32 temperature, the audit multiplies them
    # by the reciprocal (see clipaudit.models.hf_families)
    np.testing.assert_allclose(loaded.logit_scale * image_vectors @ text_vectors.T,
                               forward.logits_per_image.numpy(), rtol=0, atol=1e-5)


def test_align_cuts_texts_past_64_tokens_where_its_processor_cannot_batch_them(cache):
    from transformers import AlignProcessor, AutoTokenizer

    resolved = resolve_model(f"hf:{ALIGN_REPO}", "clip", cache_dir=str(cache))
    snapshot = _snapshot(cache, ALIGN_REPO)
    texts = [" ".join(["dog"] * 100), "x"]
    with pytest.raises(ValueError):
        AlignProcessor.from_pretrained(snapshot)(text=texts, return_tensors="pt")
    tokens = resolved.load("cpu").tokenize(texts)
    expected = AutoTokenizer.from_pretrained(snapshot)(texts, padding="max_length", max_length=64, truncation=True,
                                                       return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 64) and torch.equal(tokens["input_ids"], expected["input_ids"])
    assert int(tokens["attention_mask"][0].sum()) == 64 and int(tokens["attention_mask"][1].sum()) == 3


def test_align_without_a_processor_config_preprocesses_as_align_base(tmp_path):
    from transformers import EfficientNetImageProcessor

    from clipaudit.models.hf_processor import ALIGN_PROCESSOR as ALIGN_BASE
    from clipaudit.models.hf_processor import family_defaults

    pre = family_defaults("align")
    assert (pre.resize_size, pre.image_size, pre.rescale_factor) == (346, 289, 1 / 127.5)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (400, 500, 3), dtype=np.uint8))
    theirs = EfficientNetImageProcessor(**ALIGN_BASE)([image], return_tensors="pt").pixel_values
    assert torch.equal(torch.from_numpy(pre(image))[None], theirs)


EFFICIENTNET_CONFIGS: dict[str, dict[str, Any]] = {
    "align": TINY_ALIGN_PROCESSOR,
    "classifier-defaults": {"size": {"height": 36, "width": 36}},
    "classifier-crop": {"size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32},
                        "do_center_crop": True, "image_mean": [0.485, 0.456, 0.406],
                        "image_std": [0.229, 0.224, 0.225]},
    "offset-normalize-top": {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32},
                             "do_center_crop": True, "rescale_factor": 1 / 127.5, "rescale_offset": True,
                             "include_top": True, "resample": 3},
    "rescale-only-padded": {"size": {"height": 28, "width": 28}, "crop_size": {"height": 32, "width": 32},
                            "do_center_crop": True, "do_normalize": False, "include_top": False},
    "offset-top-unnormalised": {"size": {"height": 33, "width": 33}, "rescale_factor": 1 / 255,
                                "rescale_offset": True, "do_normalize": False, "include_top": True},
}
"""EfficientNetImageProcessor fields: ALIGN's, the class defaults (normalised and ``include_top``), and the other
branches of its arithmetic (offset then normalise; rescale alone; a crop larger than the resize; ``include_top``
without normalising)."""


def _shapes() -> list[Image.Image]:
    rng = np.random.default_rng(9)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            [(40, 52), (61, 33), (32, 32), (90, 70), (7, 120), (300, 41)]]


@pytest.mark.parametrize("name", list(EFFICIENTNET_CONFIGS))
def test_efficientnet_style_equals_efficientnet_image_processor(name):
    from transformers import EfficientNetImageProcessor

    from clipaudit.models.hf_processor import preprocess_from_processor_config

    processor = EfficientNetImageProcessor(**EFFICIENTNET_CONFIGS[name])
    pre = preprocess_from_processor_config(json.loads(processor.to_json_string()), "auto")
    assert pre.style == "efficientnet"
    for image in _shapes():
        theirs = processor([image], return_tensors="pt").pixel_values
        assert torch.equal(torch.from_numpy(pre(image))[None], theirs), (name, image.size)


@pytest.mark.parametrize("name", list(EFFICIENTNET_CONFIGS))
def test_efficientnet_style_splits_at_the_crop_as_tcac_needs(name):
    from clipaudit.model_view import center_crop_or_pad, model_inputs, resize_for_model
    from clipaudit.models.hf_processor import efficientnet_preprocess

    pre = efficientnet_preprocess(EFFICIENTNET_CONFIGS[name])
    for image in _shapes():
        resized = resize_for_model(image, pre)
        square = center_crop_or_pad(torch.from_numpy(resized.copy()).permute(2, 0, 1), pre.image_size, pre.style)
        assert np.array_equal(model_inputs(square.permute(1, 2, 0).numpy()[None], pre)[0], pre(image))


@pytest.mark.parametrize("fields,match", [
    ({"do_rescale": False}, "must resize and rescale"), ({"resample": 0}, "resample"),
    ({"size": {"shortest_edge": 32}, "do_center_crop": False}, "not square"),
    ({"size": {"height": 32, "width": 40}}, "square sizes only")])
def test_efficientnet_fields_it_cannot_reproduce_are_errors(fields, match):
    from clipaudit.models.hf_processor import efficientnet_preprocess

    with pytest.raises(ModelSpecError, match=match):
        efficientnet_preprocess(fields)


@pytest.mark.parametrize("fields", [{"rescale_offset": True}, {"normalize": False}, {"include_top": True},
                                    {"rescale_factor": 1 / 127.5}])
def test_efficientnet_fields_are_refused_on_other_styles(fields):
    from clipaudit.models import Preprocess

    with pytest.raises(ValueError, match="'efficientnet' style only"):
        Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", style="transformers", **fields)
    assert Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", style="efficientnet", **fields).style


def test_models_check_command_passes_align(cache, capsys):
    from clipaudit.cli import main

    assert main(["models", "check", f"hf:{ALIGN_REPO}", "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert f"hf:{ALIGN_REPO}: OK (clip role)" in printed and "(transformers, align)" in printed
    assert "40 -> 32 px, bilinear, squash, style efficientnet" in printed and "x * 0.00784314 - 1" in printed
    assert f"logit scale {1 / ALIGN_TEMPERATURE:.4g} (softmax)" in printed


def test_align_with_a_wordpiece_vocab_txt_only_resolves_and_tokenizes_alike(cache, tmp_path):
    import shutil

    snapshot = _snapshot(cache, ALIGN_REPO)
    local = tmp_path / "align-vocab-txt"
    shutil.copytree(snapshot, local)
    vocab = json.loads((local / "tokenizer.json").read_text())["model"]["vocab"]
    (local / "tokenizer.json").unlink()
    (local / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.__getitem__)))
    resolved = resolve_model(f"hf:{local}", "clip")
    loaded = resolved.load("cpu")
    assert loaded.vocab_size == len(vocab)
    expected = resolve_model(f"hf:{ALIGN_REPO}", "clip", cache_dir=str(cache)).load("cpu").tokenize(TEXTS)
    assert torch.equal(loaded.tokenize(TEXTS)["input_ids"], expected["input_ids"])
