"""A plug-in reference model whose worker dies on one kind of image: a pure magenta one (``os._exit``, as a
segfault in native code would). Every other image gets a small deterministic vector. For the worker-death test."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

MAGENTA = (255, 0, 255)


class DiesOnMagenta:
    """``encode_images`` ends its process when an image is all magenta."""

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            if (pixels == MAGENTA).all():
                os._exit(3)
            out.append(np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))]) + 1.0)
        return np.stack(out)


def dies_on_magenta() -> DiesOnMagenta:
    return DiesOnMagenta()
