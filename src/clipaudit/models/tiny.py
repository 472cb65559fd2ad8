"""``tiny-clip`` and ``tiny-dino``: small randomly initialised models built from configs shipped as data.

They exist for tests and for machines without weights (``models.fallback: tiny``); their findings are
meaningless. Every random initialisation in this package runs under :func:`seeded`, so every process that
builds the same random model gets bit-identical weights (a resumed run, or another Ray actor, produces the
same vectors).

- ``tiny-clip``: an open_clip CLIP from ``configs/tiny-clip.json`` (registered with
  ``open_clip.add_model_config`` under the name ``tiny-clip``; embed_dim 64, 64 px images, 2+2 layers, the
  full 49408-token BPE vocabulary, so open_clip's shipped tokenizer works).
- ``tiny-dino``: a transformers ``Dinov2Model`` from ``configs/tiny-dino.json`` (64 px, patch 16, hidden 64,
  2 layers, 2 heads); preprocessing scaled down from DINOv2's (resize 73, center crop 64, ImageNet mean/std).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Preprocess

TINY_CLIP = "tiny-clip"
TINY_DINO = "tiny-dino"
TINY_FOR_ROLE = {"clip": TINY_CLIP, "reference": TINY_DINO}
SEED = 0

_register_lock = threading.Lock()


def config_path(name: str) -> Path:
    """The JSON config shipped for a tiny model (``tiny-clip`` or ``tiny-dino``)."""
    path = Path(str(resources.files("clipaudit.models") / "configs" / f"{name}.json"))
    if not path.is_file():
        raise FileNotFoundError(f"missing packaged model config {path}")
    return path


def load_config(name: str) -> dict[str, Any]:
    """The parsed JSON config of a tiny model."""
    return json.loads(config_path(name).read_text(encoding="utf-8"))


def register_open_clip_config() -> None:
    """Make ``tiny-clip`` known to open_clip (idempotent, thread-safe)."""
    import open_clip

    with _register_lock:
        if TINY_CLIP not in open_clip.list_models():
            open_clip.add_model_config(config_path(TINY_CLIP))


@contextlib.contextmanager
def seeded(seed: int = SEED) -> Iterator[None]:
    """Seed torch's CPU generator inside ``fork_rng``: deterministic init, the caller's RNG state untouched.

    Build models on the CPU inside this block and move them afterwards, so the weights do not depend on the
    device.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def preprocess_for(name: str) -> Preprocess:
    """The preprocessing of a tiny model."""
    if name == TINY_CLIP:
        size = int(load_config(TINY_CLIP)["vision_cfg"]["image_size"])
        return Preprocess(size, size, OPENAI_MEAN, OPENAI_STD, "bicubic")
    if name == TINY_DINO:
        size = int(load_config(TINY_DINO)["image_size"])
        return Preprocess(size, round(size * 256 / 224), IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    raise KeyError(name)


def dim_for(name: str) -> int:
    """The embedding dimension of a tiny model."""
    if name == TINY_CLIP:
        return int(load_config(TINY_CLIP)["embed_dim"])
    return int(load_config(TINY_DINO)["hidden_size"])
