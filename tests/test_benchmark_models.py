"""A colour-aware, aligned image-text plug-in for the benchmark tests: ``python:test_benchmark_models:colour_aligned``.

Its image tower is the share of pixels of each named colour of the synthetic scenes; its text tower counts the
colour words of a caption. An image and a caption agree exactly when they name the same colours, so it tells two
scenes that differ only in colour apart, which the colour-blind plug-in of ``planted_models`` cannot.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipaudit.probe.scenes import COLOURS, SceneSpec, ShapeGroup, render_scene

NAMES = tuple(COLOURS)
TOLERANCE = 40
BIAS = 1e-3


class ColourAligned:
    """Colour shares (images) against colour words (texts), in one space."""

    logit_scale = 100.0
    dim = len(NAMES) + 1

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Per image: the share of pixels within TOLERANCE of each named colour, and a small constant."""
        out = np.full((len(images), self.dim), BIAS)
        for row, image in enumerate(images):
            pixels = np.asarray(image.convert("RGB")).astype(np.int16).reshape(-1, 3)
            for column, name in enumerate(NAMES):
                near = (np.abs(pixels - np.array(COLOURS[name])) <= TOLERANCE).all(axis=1)
                out[row, column] += near.mean()
        return out

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Per text: how often each colour is named, and a small constant."""
        out = np.full((len(texts), self.dim), BIAS)
        for row, text in enumerate(texts):
            words = text.lower().replace(",", " ").replace(";", " ").split()
            for column, name in enumerate(NAMES):
                out[row, column] += words.count(name)
        return out


def colour_aligned() -> ColourAligned:
    """Factory of the aligned plug-in."""
    return ColourAligned()


def test_the_aligned_model_matches_a_scene_to_its_colour_words():
    model = ColourAligned()
    scenes = [SceneSpec((ShapeGroup("circle", colour, "left", 1),)) for colour in ("red", "blue")]
    images = model.encode_images([render_scene(s) for s in scenes])
    texts = model.encode_texts([s.captions()[0] for s in scenes])
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    sims = images @ texts.T
    assert sims[0, 0] > 0.9 > 0.1 > sims[0, 1] and sims[1, 1] > 0.9 > 0.1 > sims[1, 0]
