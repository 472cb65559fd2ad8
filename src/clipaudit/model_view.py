"""The image as a model sees it, split at the centre crop: where TCAC applies its transforms.

A model's :class:`~clipaudit.models.Preprocess` resizes an image, then centre-crops (or pads) it to the model's
square input and normalises it. TCAC transforms the image between the two steps, at the model's resolution:

1. :func:`resize_for_model` (a CPU task, PIL): the resize of ``Preprocess.geometry`` alone. For images far from
   square it then keeps a centred window at most :data:`MAX_ASPECT` times as long as it is wide (or tall), so a
   1:50 strip costs what a 1:4 image does; the window holds the crop, which it leaves exactly where it was. The
   transforms act on that window: for such strips, what a rotation or shift brings into view comes from it.
2. :func:`center_crop_or_pad` (tensors, on any device): the crop of ``Preprocess.geometry``, pixel for pixel
   (offsets rounded or truncated as the preprocessing's style does).
3. :func:`model_inputs` (numpy): the model's own ``Preprocess`` over the cropped squares (normalisation, or RGB
   pixels for ``python:`` plug-ins), so the values are exactly those the embed stage computes.

For the untransformed image, 1 + 2 + 3 give the same array as ``Preprocess.__call__``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clipaudit.models import Preprocess

MAX_ASPECT = 4
"""The longest the resized image may be, in multiples of its short side, before it is windowed."""


FULL_RESIZE_PIXELS = 16_000_000
"""Above this many pixels the resized image is never made whole: only its window is."""


def _window(extent: int, other: int, crop: int) -> tuple[int, int]:
    """(offset, length) of the centred window kept along an axis of ``extent`` pixels whose other side is
    ``other``: at most ``MAX_ASPECT * max(other, crop)`` long, and cut so that the centre crop's offset stays
    the same integer (the cut is a multiple of 4, halved on each side)."""
    limit = MAX_ASPECT * max(other, crop)
    if extent <= limit:
        return 0, extent
    length = limit + (extent - limit) % 4
    return (extent - length) // 2, length


def resize_for_model(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The uint8 ``H x W x 3`` pixels of an image resized as ``preprocess`` resizes it (before its crop),
    windowed to at most :data:`MAX_ASPECT` : 1 around the centre. Where the whole resized image would exceed
    :data:`FULL_RESIZE_PIXELS` (``"torchvision"`` style), only the window is resampled (PIL's ``box``: the same
    filter over the same source pixels, up to rounding, so a pixel may differ by one grey level)."""
    from PIL import Image as PILImage

    from clipaudit.models.preprocess import tensor_resize

    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    new_w, new_h = preprocess.resized_size(width, height)
    if new_w < 1 or new_h < 1:
        raise ValueError(f"a {width}x{height} image resizes to {new_w}x{new_h} pixels for this model")
    left, kept_w = _window(new_w, new_h, preprocess.image_size)
    top, kept_h = _window(new_h, new_w, preprocess.image_size)
    windowed = (kept_w, kept_h) != (new_w, new_h)
    if preprocess.style != "torchvision":
        pixels = tensor_resize(np.asarray(image, dtype=np.uint8), new_w, new_h, preprocess.interpolation)
        return np.ascontiguousarray(pixels[top:top + kept_h, left:left + kept_w])
    resample = (PILImage.Resampling.BICUBIC if preprocess.interpolation == "bicubic"
                else PILImage.Resampling.BILINEAR)
    if windowed and new_w * new_h > FULL_RESIZE_PIXELS:
        scale_x, scale_y = width / new_w, height / new_h
        box = (left * scale_x, top * scale_y, (left + kept_w) * scale_x, (top + kept_h) * scale_y)
        return np.asarray(image.resize((kept_w, kept_h), resample, box=box), dtype=np.uint8)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    if windowed:
        image = image.crop((left, top, left + kept_w, top + kept_h))
    return np.array(image, dtype=np.uint8)


def center_crop_or_pad(image: torch.Tensor, size: int, style: str = "torchvision") -> torch.Tensor:
    """The centre ``size x size`` of a ``(C, H, W)`` tensor, padded with zeros (black) where it is smaller."""
    import torch

    from clipaudit.models.preprocess import crop_box

    channels, height, width = image.shape
    left, top = crop_box(width, height, size, style)
    if 0 <= left and 0 <= top and left + size <= width and top + size <= height:
        return image[:, top:top + size, left:left + size]
    out = torch.zeros(channels, size, size, dtype=image.dtype, device=image.device)
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + size, width), min(top + size, height)
    if src_x1 > src_x0 and src_y1 > src_y0:
        out[:, src_y0 - top:src_y1 - top, src_x0 - left:src_x1 - left] = image[:, src_y0:src_y1, src_x0:src_x1]
    return out


def model_inputs(squares: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """``Preprocess`` outputs for uint8 ``(N, S, S, 3)`` squares already at the model's size (``S`` =
    ``image_size``): the model's own preprocessing, whose resize and crop leave such a square as it is."""
    from PIL import Image as PILImage

    square = dataclasses.replace(preprocess, resize_size=preprocess.image_size, resize_mode="squash")
    out = np.empty((len(squares), *preprocess.output_shape), dtype=preprocess.output_dtype)
    for i, pixels in enumerate(squares):
        out[i] = square(PILImage.fromarray(np.ascontiguousarray(pixels), "RGB"))
    return out
