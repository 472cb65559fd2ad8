"""``open_clip:hf-hub:ORG/NAME`` (how EVA, MetaCLIP, DFN, SigLIP and PE checkpoints are published for open_clip)
from a fake hub cache, against open_clip's own ``create_model_and_transforms`` and tokenizer on the same files: a
CLIP-style repo (open_clip's BPE tokenizer) and a SigLIP-style one (a Hugging Face sentencepiece tokenizer named by
``hf_tokenizer_name``, text padded to 64 tokens and pooled at the last one, a logit bias)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_cache import add_repo
from PIL import Image

from clipaudit.models import ModelUnavailableError, resolve_model, tiny
from clipaudit.models.provenance import provenance

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = "test-org/tiny-open-clip"
SIGLIP_REPO = "test-org/tiny-open-clip-siglip"
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "shortest"}


def _siglip_config(tokens: int) -> dict:
    """tiny-clip made SigLIP-like as open_clip's ViT-*-SigLIP configs are: a custom text tower without causal mask,
    pooled at the last token, its tokenizer from the Hub, a logit bias."""
    import open_clip

    base = open_clip.get_model_config("tiny-clip")
    text = {**base["text_cfg"], "context_length": 64, "vocab_size": tokens, "hf_tokenizer_name": SIGLIP_REPO,
            "tokenizer_kwargs": {"clean": "canonicalize"}, "no_causal_mask": True, "proj_bias": True,
            "pool_type": "last"}
    return {**base, "init_logit_bias": -10.0, "custom_text": True, "text_cfg": text}


def _save_repo(files: Path, model_name: str, model_cfg: dict) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = open_clip.create_model(model_name, device="cpu", precision="fp32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files / "open_clip_model.safetensors")
    (files / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    import open_clip
    from family_checkpoints import siglip_tokenizer

    tiny.register_open_clip_config()
    root = tmp_path_factory.mktemp("hub") / "cache"
    files = tmp_path_factory.mktemp("open_clip_repo")
    _save_repo(files, "tiny-clip", open_clip.get_model_config("tiny-clip"))
    add_repo(root, REPO, files)

    files = tmp_path_factory.mktemp("open_clip_siglip_repo")
    tokenizer = siglip_tokenizer(files)
    tokenizer.save_pretrained(files)
    config = _siglip_config(len(tokenizer))
    configs = tmp_path_factory.mktemp("configs")
    (configs / "tiny-siglip-hub-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    _save_repo(files, "tiny-siglip-hub-test", config)
    add_repo(root, SIGLIP_REPO, files)
    return root


@pytest.mark.parametrize("repo", [REPO, SIGLIP_REPO])
def test_an_open_clip_hub_repo_equals_open_clips_own_pipeline(cache, repo):
    import open_clip

    resolved = resolve_model(f"open_clip:hf-hub:{repo}", "clip", cache_dir=str(cache))
    model, _, transform = open_clip.create_model_and_transforms(f"hf-hub:{repo}", cache_dir=str(cache))
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = next(folder.glob("snapshots/*"))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{snapshot}")
    model.eval()
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 80), (81, 41)]]
    ours = np.stack([resolved.preprocess(image) for image in images])
    theirs = torch.stack([transform(image) for image in images])
    assert torch.equal(torch.from_numpy(ours), theirs)
    loaded = resolved.load("cpu")
    texts = ["a red circle", "Two blue squares, on the left!"]
    tokens = tokenizer(texts)
    if repo == SIGLIP_REPO:
        assert type(tokenizer.tokenizer).__name__ == "SiglipTokenizer" and tokens.shape == (2, 64)
        assert loaded.logit_bias == pytest.approx(-10.0)
    else:
        assert np.isnan(loaded.logit_bias)
    with torch.inference_mode():
        image_ref = torch.nn.functional.normalize(model.encode_image(theirs), dim=-1).numpy()
        text_ref = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images(ours), image_ref, atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(texts), text_ref, atol=1e-6)
    facts = provenance(resolved)
    weights = snapshot / "open_clip_model.safetensors"
    assert facts["source"] == repo and facts["revision"] == snapshot.name
    assert facts["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_hub_tokenizer_loads_offline_from_a_repo_without_config_json(cache):
    """open_clip's own ``get_tokenizer`` of the SigLIP-style repo fails offline: transformers looks up the repo's
    ``config.json``, which an open_clip repo lacks and the cache cannot hold. The backend's tokenizer loads, and
    tokenizes as open_clip does from the same files."""
    import open_clip

    from clipaudit.models.open_clip_backend import get_tokenizer

    with pytest.raises(OSError, match="config.json|cached files|disk cache"):
        open_clip.get_tokenizer(f"hf-hub:{SIGLIP_REPO}", cache_dir=str(cache))
    ours = get_tokenizer("spec", f"hf-hub:{SIGLIP_REPO}", str(cache))
    snapshot = next((cache / ("models--" + SIGLIP_REPO.replace("/", "--"))).glob("snapshots/*"))
    texts = ["A Photo of a Dog!", "x"]
    assert torch.equal(ours(texts), open_clip.get_tokenizer(f"local-dir:{snapshot}")(texts))


def test_a_repo_not_in_the_cache_is_unavailable_and_falls_back(cache):
    with pytest.raises(ModelUnavailableError, match="not in the cache"):
        resolve_model("open_clip:hf-hub:test-org/absent", "clip", cache_dir=str(cache))
    fallback = resolve_model("open_clip:hf-hub:test-org/absent", "clip", cache_dir=str(cache), fallback="tiny")
    assert fallback.spec == "tiny-clip" and fallback.requested_spec == "open_clip:hf-hub:test-org/absent"
