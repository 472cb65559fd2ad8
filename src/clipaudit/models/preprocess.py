"""Image preprocessing as data: a small, picklable description applied with PIL and numpy only.

The geometry follows torchvision / open_clip inference transforms exactly (the same PIL resize calls, the same
crop offsets), so a `Preprocess` built from a model's config gives the pixels that model was evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

KINDS = ("normalize", "rgb")
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its images: resize, center crop, then normalise (or hand over RGB pixels).

    Attributes:
        image_size: side of the square the model sees.
        resize_size: ``resize_mode="shortest"``: the shorter side is resized to this, then the center
            ``image_size`` square is cropped (DINOv2: 256 then 224; CLIP: 224 then 224).
        mean, std: per-channel normalisation of pixel values scaled to [0, 1].
        interpolation: ``"bicubic"`` or ``"bilinear"`` (PIL resampling, antialiased like torchvision on PIL).
        kind: ``"normalize"``: a float32 CHW array, normalised; ``"rgb"``: a uint8 HWC RGB array of
            ``image_size x image_size`` (for ``python:`` plug-ins, which receive PIL images).
        resize_mode: ``"shortest"`` (resize the shorter side, center crop), ``"squash"`` (resize both sides to
            ``image_size``, aspect ratio not kept) or ``"longest"`` (resize the longer side to ``image_size``,
            pad with black to a square), as in open_clip's ``resize_mode``.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    kind: str = "normalize"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if int(self.image_size) <= 0 or int(self.resize_size) <= 0:
            raise ValueError(f"image_size and resize_size must be positive, got {self.image_size}, {self.resize_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one output: (3, S, S) for ``normalize``, (S, S, 3) for ``rgb``."""
        s = self.image_size
        return (3, s, s) if self.kind == "normalize" else (s, s, 3)

    @property
    def output_dtype(self) -> np.dtype:
        """float32 for ``normalize``, uint8 for ``rgb``."""
        return np.dtype(np.float32) if self.kind == "normalize" else np.dtype(np.uint8)

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop (or pad) an RGB image to ``image_size x image_size``."""
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        w, h = image.size
        s = self.image_size
        if self.resize_mode == "squash":
            new_w, new_h = s, s
        elif self.resize_mode == "longest":
            ratio = max(h / s, w / s)
            new_w, new_h = round(w / ratio), round(h / ratio)
        else:
            target = self.resize_size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = target, int(target * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        return _center_crop_or_pad(image, s)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Preprocess one RGB PIL image: a float32 (3, S, S) normalised array, or a uint8 (S, S, 3) RGB array."""
        pixels = np.asarray(self.geometry(image), dtype=np.uint8)
        if self.kind == "rgb":
            return np.ascontiguousarray(pixels)
        scale = np.asarray([1.0 / (255.0 * sd) for sd in self.std], dtype=np.float32)
        shift = np.asarray([m / sd for m, sd in zip(self.mean, self.std, strict=True)], dtype=np.float32)
        out = pixels.astype(np.float32) * scale - shift
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def _center_crop_or_pad(image: Image.Image, size: int) -> Image.Image:
    """torchvision's center crop: pad with black where the image is smaller, then crop the center square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    left = -((size - w) // 2) if size > w else round((w - size) / 2.0)
    top = -((size - h) // 2) if size > h else round((h - size) / 2.0)
    return image.crop((left, top, left + size, top + size))
