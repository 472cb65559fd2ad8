"""Plug-in models with a blind spot planted by construction, for the DAF tests.

``python:planted_models:colour_blind`` (the CLIP role) sees only *where* the shapes are: the share of
foreground pixels (pixels that differ from the background, read at the top-left corner) in each cell of a
``GRID x GRID`` grid. Two scenes that differ only by colour have exactly the same vector.

``python:planted_models:colour_aware`` (the reference role) sees the same layout plus the colours: the unit
layout vector next to a unit histogram of the foreground pixels' colours (4 levels per channel), with equal
weight. Two colour variants of one layout have reference similarity 0.5 (same layout, no shared colour).

``python:planted_models:position_blind`` (the CLIP role) sees only *which colours* the shapes have: the unit
histogram of the foreground pixels' colours. Two scenes that differ only by where one shape of one size is have
exactly the same vector. ``python:planted_models:all_seeing`` (the CLIP role) sees what the reference sees.
``python:planted_models:layout_only`` is the colour-blind model under another name (a fourth model for tests
that add one to a run).

All are deterministic and work on any RGB image; none needs weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

GRID = 16
LEVELS = 4
THRESHOLD = 30


def foreground(pixels: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background colour (the top-left pixel) by more than THRESHOLD in a channel."""
    background = pixels[0, 0].astype(np.int16)
    return (np.abs(pixels.astype(np.int16) - background) > THRESHOLD).any(axis=2)


def layout(mask: np.ndarray) -> np.ndarray:
    """Share of foreground pixels in each cell of a GRID x GRID grid (colour never enters)."""
    h, w = mask.shape
    rows = np.minimum(np.arange(h) * GRID // h, GRID - 1)
    cols = np.minimum(np.arange(w) * GRID // w, GRID - 1)
    cells = np.zeros((GRID, GRID))
    np.add.at(cells, (rows[:, None], cols[None, :]), mask)
    return cells.ravel() / (h * w / GRID**2)


def colours(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Histogram of the foreground pixels' colours, LEVELS levels per channel."""
    bins = (pixels[mask].astype(np.int64) * LEVELS // 256) @ np.array([LEVELS * LEVELS, LEVELS, 1])
    return np.bincount(bins, minlength=LEVELS**3).astype(np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


class ColourBlind:
    """Layout only: a CLIP-role plug-in that cannot tell colours apart."""

    logit_scale = 100.0
    dim = GRID * GRID

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """One layout vector per image."""
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"))
            out.append(layout(foreground(pixels)) + 1e-6)
        return np.stack(out)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """A hashed bag of words (the text tower is not under test)."""
        out = np.full((len(texts), self.dim), 1e-6)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.sha1(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out


class ColourAware:
    """Layout and colour, equally weighted: the reference role."""

    dim = GRID * GRID + LEVELS**3

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """One (unit layout, unit colour histogram) vector per image."""
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"))
            mask = foreground(pixels)
            out.append(np.concatenate([_unit(layout(mask) + 1e-6), _unit(colours(pixels, mask))]))
        return np.stack(out)


class _HashedText:
    """A hashed bag of words as the text tower (the text tower is not under test)."""

    logit_scale = 100.0
    dim = GRID * GRID

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """One hashed bag-of-words vector per text."""
        return ColourBlind.encode_texts(self, texts)  # type: ignore[arg-type]


class PositionBlind(_HashedText):
    """Colours only: a CLIP-role plug-in that cannot tell where a shape is."""

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """One unit colour-histogram vector per image (padded to the text dimension)."""
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"))
            hist = _unit(colours(pixels, foreground(pixels)) + 1e-6)
            out.append(np.concatenate([hist, np.zeros(self.dim - len(hist))]))
        return np.stack(out)


class AllSeeing(_HashedText):
    """Layout and colour, as the reference sees them: a CLIP-role plug-in without a planted blind spot."""

    def __init__(self) -> None:
        self.dim = ColourAware.dim

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """The reference's vectors."""
        return ColourAware().encode_images(images)


def position_blind() -> PositionBlind:
    """Factory of the position-blind CLIP-role model."""
    return PositionBlind()


def all_seeing() -> AllSeeing:
    """Factory of the CLIP-role model that sees what the reference sees."""
    return AllSeeing()


def layout_only() -> ColourBlind:
    """The colour-blind CLIP-role model under another spec."""
    return ColourBlind()


def colour_blind() -> ColourBlind:
    """Factory of the CLIP-role model."""
    return ColourBlind()


def colour_aware() -> ColourAware:
    """Factory of the reference-role model."""
    return ColourAware()
