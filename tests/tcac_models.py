"""``python:`` plug-in models for the tcac tests: deterministic, tiny, and invariant (or not) to horizontal flips
by construction.

Texts: a hashed bag of words (lower-cased words, stable hash) projected to ``DIM`` by a fixed random matrix.
Images: the RGB sums of an 8 x 8 grid of cells (exact integers), projected the same way. ``flip_invariant``
adds the grid to its left-right mirror first, so an image and its mirror give bit-identical features;
``flip_sensitive`` does not.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

DIM = 32
GRID = 8
BUCKETS = 256
SIZE = 32


def _word_bucket(word: str) -> int:
    return int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little") % BUCKETS


class _HashClip:
    """A CLIP-role plug-in: ``encode_images``, ``encode_texts`` and ``logit_scale``."""

    logit_scale = 100.0
    dim = DIM
    image_size = SIZE

    def __init__(self, symmetric: bool) -> None:
        rng = np.random.default_rng(1234)
        self.symmetric = symmetric
        self.text_projection = rng.standard_normal((BUCKETS, DIM)).astype(np.float32)
        self.image_projection = rng.standard_normal((GRID * GRID * 3, DIM)).astype(np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        counts = np.zeros((len(texts), BUCKETS), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                counts[i, _word_bucket(word)] += 1.0
        return counts @ self.text_projection

    def encode_images(self, images: list) -> np.ndarray:
        rows = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
            h, w, _ = pixels.shape
            cells = pixels[: h - h % GRID, : w - w % GRID].reshape(GRID, h // GRID, GRID, w // GRID, 3)
            grid = cells.sum(axis=(1, 3))
            if self.symmetric:
                grid = grid + grid[:, ::-1]
            features = grid.reshape(-1).astype(np.float32) / float(grid.max() or 1) - 0.5
            rows.append(features @ self.image_projection)
        return np.stack(rows)


def flip_invariant() -> _HashClip:
    """Features symmetric under a left-right flip: ``changed`` is 0 for every image under hflip."""
    return _HashClip(symmetric=True)


def flip_sensitive() -> _HashClip:
    """The same model without the symmetrisation."""
    return _HashClip(symmetric=False)


flip_invariant.image_size = SIZE
flip_sensitive.image_size = SIZE
