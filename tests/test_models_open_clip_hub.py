"""``open_clip:hf-hub:ORG/NAME`` (how EVA, MetaCLIP, DFN, SigLIP and PE checkpoints are published for open_clip)
from a fake hub cache, against open_clip's own ``create_model_and_transforms`` and tokenizer on the same files."""

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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    import open_clip
    from safetensors.torch import save_file

    tiny.register_open_clip_config()
    files = tmp_path_factory.mktemp("open_clip_repo")
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip", device="cpu", precision="fp32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files / "open_clip_model.safetensors")
    config = {"model_cfg": open_clip.get_model_config("tiny-clip"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                                 "resize_mode": "shortest"}}
    (files / "open_clip_config.json").write_text(json.dumps(config))
    root = tmp_path_factory.mktemp("hub") / "cache"
    add_repo(root, REPO, files)
    return root


def test_an_open_clip_hub_repo_equals_open_clips_own_pipeline(cache):
    import open_clip

    resolved = resolve_model(f"open_clip:hf-hub:{REPO}", "clip", cache_dir=str(cache))
    model, _, transform = open_clip.create_model_and_transforms(f"hf-hub:{REPO}", cache_dir=str(cache))
    tokenizer = open_clip.get_tokenizer(f"hf-hub:{REPO}", cache_dir=str(cache))
    model.eval()
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 80), (81, 41)]]
    ours = np.stack([resolved.preprocess(image) for image in images])
    theirs = torch.stack([transform(image) for image in images])
    assert torch.equal(torch.from_numpy(ours), theirs)
    loaded = resolved.load("cpu")
    texts = ["a red circle", "two blue squares on the left"]
    with torch.inference_mode():
        image_ref = torch.nn.functional.normalize(model.encode_image(theirs), dim=-1).numpy()
        text_ref = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images(ours), image_ref, atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(texts), text_ref, atol=1e-6)
    facts = provenance(resolved)
    weights = next(cache.rglob("snapshots/*/open_clip_model.safetensors"))
    assert facts["source"] == REPO and facts["revision"] == weights.parent.name
    assert facts["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_repo_not_in_the_cache_is_unavailable_and_falls_back(cache):
    with pytest.raises(ModelUnavailableError, match="not in the cache"):
        resolve_model("open_clip:hf-hub:test-org/absent", "clip", cache_dir=str(cache))
    fallback = resolve_model("open_clip:hf-hub:test-org/absent", "clip", cache_dir=str(cache), fallback="tiny")
    assert fallback.spec == "tiny-clip" and fallback.requested_spec == "open_clip:hf-hub:test-org/absent"
