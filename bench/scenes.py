"""Generated test scenes for the benchmarks that need images without a dataset: 500 x 375 RGB, a background and
four rectangles, seeded."""

from __future__ import annotations

from typing import Any

import numpy as np


def random_scenes(count: int, seed: int = 0) -> list[Any]:
    """``count`` generated 500 x 375 RGB scenes (PIL images: a background and four rectangles)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = np.empty((375, 500, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        for _ in range(4):
            x, y = int(rng.integers(0, 400)), int(rng.integers(0, 300))
            pixels[y:y + 80, x:x + 100] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(pixels))
    return images
