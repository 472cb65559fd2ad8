"""Plug-in models that are broken the ways ``clipaudit models check`` must catch."""

from __future__ import annotations

import numpy as np
from PIL import Image


class ConstantText:
    """Images get a vector from their mean colour; every text gets the same vector (a broken tokenizer)."""

    logit_scale = 100.0

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([np.asarray(i.convert("RGB"), np.float32).mean(axis=(0, 1)) + 1.0 for i in images])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 3), np.float32)


class NanImages(ConstantText):
    """Images get NaN vectors."""

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return np.full((len(images), 3), np.nan, np.float32)


def constant_text() -> ConstantText:
    return ConstantText()


def nan_images() -> NanImages:
    return NanImages()
