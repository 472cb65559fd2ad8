"""Image preprocessing as data: a small, picklable description of how one model wants its images.

Two styles, each identical (the same uint8 pixels, the same float32 arithmetic) to a reference implementation:

- ``"torchvision"``: torchvision's transforms applied to a PIL image, as open_clip's inference transform does
  (and DINOv2's own repository): PIL resize, center crop offsets rounded (``round((h - s) / 2)``),
  ``ToTensor`` (``x / 255``) then ``Normalize`` (``(x - mean) / std``).
- ``"transformers"``: transformers' image processors (``CLIPImageProcessor``, ``BitImageProcessor`` for DINOv2)
  with their default torchvision backend: the uint8 tensor resized by torchvision (antialiased), center crop
  offsets truncated (``int((h - s) / 2)``), rescale fused into normalisation (``(x - 255 mean) / (255 std)``).

- ``"transformers_float"``: the image processors that rescale before they resize (DINOv3's): the uint8 image
  scaled to [0, 1] in float32, resized there by torchvision (antialiased), center cropped, then normalised. Its
  :meth:`Preprocess.geometry` (the uint8 pixels TCAC and the report work on) is the ``"transformers"`` one.

- ``"efficientnet"``: transformers' ``EfficientNetImageProcessor`` (ALIGN's): the ``"transformers"`` geometry,
  except that ``"squash"`` resizes both sides to ``resize_size`` and then center crops ``image_size`` (ALIGN: 346
  then 289), and its own arithmetic on the uint8 crop ``x``: without an offset and with normalisation, the fused
  ``(x - 255 mean) / (255 std)`` of the ``"transformers"`` style (for any rescale factor: ``1 / rescale_factor``
  in place of 255); otherwise ``x * rescale_factor``, minus 1 when ``rescale_offset`` (ALIGN: ``x / 127.5 - 1``,
  values in [-1, 1]), then ``(x - mean) / std`` when ``normalize``; and ``include_top`` divides by ``std`` once
  more. The fields ``rescale_factor``, ``rescale_offset``, ``normalize`` and ``include_top`` belong to this style
  alone.

- ``"timm"``: timm's eval transform where the ``"torchvision"`` style cannot give its pixels (the same PIL resize,
  rounded crop offsets and arithmetic): ``"squash"`` resizes both sides to ``resize_size`` (timm's
  ``img_size / crop_pct``) then center crops, ``"longest"`` resizes the longer side to ``resize_size`` and pads
  with the mean colour (``round(255 * mean)``, timm's ``crop_mode="border"``); ``"shortest"`` is ``"torchvision"``'s.

The two differ by a pixel where the resized side minus the crop is odd (the crop offset) and by one or two
levels at some pixels (PIL's resampling against torch's): enough to move an embedding (cosine 0.99), so each
model is fed the style it was evaluated with. The ``"torchvision"`` style uses PIL and numpy only; the
``"transformers"`` style imports torch and torchvision to resize.
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
STYLES = ("torchvision", "transformers", "transformers_float", "timm", "efficientnet")
_RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its images: resize, center crop, then normalise (or hand over RGB pixels).

    Attributes:
        image_size: side of the square the model sees.
        resize_size: ``resize_mode="shortest"``: the shorter side is resized to this, then the center
            ``image_size`` square is cropped (DINOv2: 256 then 224; CLIP: 224 then 224).
        mean, std: per-channel normalisation of pixel values scaled to [0, 1].
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased when shrinking, in both styles).
        kind: ``"normalize"``: a float32 CHW array, normalised; ``"rgb"``: a uint8 HWC RGB array of
            ``image_size x image_size`` (for ``python:`` plug-ins, which receive PIL images).
        resize_mode: ``"shortest"`` (resize the shorter side, center crop), ``"squash"`` (resize both sides to
            ``image_size``, aspect ratio not kept) or ``"longest"`` (resize the longer side to ``image_size``,
            pad with black to a square; ``"torchvision"`` and ``"timm"`` styles only), as in open_clip's
            ``resize_mode`` (``"timm"`` and ``"efficientnet"`` styles: resized to ``resize_size``, see the module).
        style: whose implementation the pixels are identical to: ``"torchvision"`` (open_clip, torchvision
            transforms on PIL images) or ``"transformers"`` (transformers' image processors); see the module.
        rescale_factor: ``"efficientnet"`` style: the factor the uint8 values are multiplied by (ALIGN: 1/127.5).
        rescale_offset: ``"efficientnet"`` style: subtract 1 after the rescale (ALIGN: values in [-1, 1]).
        normalize: ``"efficientnet"`` style: apply ``(x - mean) / std`` (ALIGN: no).
        include_top: ``"efficientnet"`` style: divide by ``std`` once more at the end (ALIGN: no).
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    kind: str = "normalize"
    resize_mode: str = "shortest"
    style: str = "torchvision"
    rescale_factor: float = _RESCALE_FACTOR
    rescale_offset: bool = False
    normalize: bool = True
    include_top: bool = False

    def __post_init__(self) -> None:
        if int(self.image_size) <= 0 or int(self.resize_size) <= 0:
            raise ValueError(f"image_size and resize_size must be positive, got {self.image_size}, {self.resize_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.style not in ("torchvision", "timm") and self.resize_mode == "longest":
            raise ValueError("resize_mode 'longest' exists in the 'torchvision' and 'timm' styles only")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")
        self._check_efficientnet_fields()
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def _check_efficientnet_fields(self) -> None:
        """ValueError for a rescale factor that is not positive, or ``"efficientnet"`` fields set on another
        style (whose arithmetic would silently ignore them)."""
        if not float(self.rescale_factor) > 0:
            raise ValueError(f"rescale_factor must be positive, got {self.rescale_factor}")
        own = (float(self.rescale_factor) != _RESCALE_FACTOR or self.rescale_offset or not self.normalize
               or self.include_top)
        if own and self.style != "efficientnet":
            raise ValueError("rescale_factor, rescale_offset, normalize and include_top exist in the "
                             "'efficientnet' style only")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one output: (3, S, S) for ``normalize``, (S, S, 3) for ``rgb``."""
        s = self.image_size
        return (3, s, s) if self.kind == "normalize" else (s, s, 3)

    @property
    def output_dtype(self) -> np.dtype:
        """float32 for ``normalize``, uint8 for ``rgb``."""
        return np.dtype(np.float32) if self.kind == "normalize" else np.dtype(np.uint8)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the resize, before the crop (or pad)."""
        s = self.resize_size if self.style in ("timm", "efficientnet") else self.image_size
        if self.resize_mode == "squash":
            return s, s
        if self.resize_mode == "longest":
            ratio = max(height / s, width / s)
            return round(width / ratio), round(height / ratio)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def geometry(self, image: Image.Image) -> np.ndarray:
        """Resize and crop (or pad) an image: the uint8 (S, S, 3) RGB pixels the model sees."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.style == "timm":
            fill = tuple(round(255 * m) for m in self.mean) if self.resize_mode == "longest" else (0, 0, 0)
            return _timm_geometry(image, self.resized_size(*image.size), self.image_size, self.interpolation, fill)
        if self.style != "torchvision":
            return _transformers_geometry(image, self.resized_size(*image.size), self.image_size, self.interpolation)
        return _torchvision_geometry(image, self.resized_size(*image.size), self.image_size, self.interpolation)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Preprocess one PIL image: a float32 (3, S, S) normalised array, or a uint8 (S, S, 3) RGB array."""
        if self.style == "transformers_float" and self.kind == "normalize":
            return self._float_first(image)
        pixels = self.geometry(image)
        if self.kind == "rgb":
            return pixels
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        if self.style == "efficientnet":
            return np.ascontiguousarray(self._efficientnet_values(chw, mean, std))
        if self.style == "transformers":
            scale = np.float32(1.0 / _RESCALE_FACTOR)
            out = (chw - mean * scale) / (std * scale)
        else:
            out = (chw / np.float32(255.0) - mean) / std
        return np.ascontiguousarray(out)

    def _efficientnet_values(self, chw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """``"efficientnet"``: ``EfficientNetImageProcessor``'s rescale, normalisation and ``include_top``, in its
        float32 operations and order, on the float32 copy of the uint8 crop."""
        if self.normalize and not self.rescale_offset:
            scale = np.float32(1.0 / float(self.rescale_factor))
            out = (chw - mean * scale) / (std * scale)
        else:
            out = chw * np.float32(self.rescale_factor)
            if self.rescale_offset:
                out -= np.float32(1.0)
            if self.normalize:
                out = (out - mean) / std
        return out / std if self.include_top else out

    def _float_first(self, image: Image.Image) -> np.ndarray:
        """``"transformers_float"``: rescale to [0, 1] in float32, resize, crop, normalise (in that order)."""
        import torch
        from torchvision.transforms.v2 import functional as tvF

        rgb = image.convert("RGB") if image.mode != "RGB" else image
        tensor = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        pixels = tensor.to(torch.float32) * _RESCALE_FACTOR
        width, height = self.resized_size(*rgb.size)
        if (height, width) != tuple(pixels.shape[-2:]):
            mode = tvF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else tvF.InterpolationMode.BILINEAR
            pixels = tvF.resize(pixels[None], [height, width], interpolation=mode, antialias=True)[0]
        left, top = crop_box(width, height, self.image_size, "transformers")
        if left < 0 or top < 0:
            raise ValueError("transformers_float: padding is not supported (the resize is smaller than the crop)")
        pixels = pixels[:, top:top + self.image_size, left:left + self.image_size]
        out = tvF.normalize(pixels, list(self.mean), list(self.std))
        return np.ascontiguousarray(out.numpy().astype(np.float32, copy=False))


def crop_box(width: int, height: int, crop: int, style: str = "torchvision") -> tuple[int, int]:
    """(left, top) of the centre ``crop x crop`` window of a ``width x height`` image in ``style``: offsets
    rounded (torchvision's ``CenterCrop``) or truncated (transformers); negative where the image is padded
    (black, split as both implementations split it: the smaller half before)."""

    def offset(extent: int) -> int:
        if crop > extent:
            return -((crop - extent) // 2)
        return int((extent - crop) / 2.0) if style not in ("torchvision", "timm") else round((extent - crop) / 2.0)

    return offset(width), offset(height)


def tensor_resize(pixels: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """torchvision's antialiased resize of uint8 ``H x W x 3`` pixels (transformers' image processors)."""
    import torch
    from torchvision.transforms.v2 import functional as tvF

    if pixels.shape[:2] == (height, width):
        return pixels
    mode = tvF.InterpolationMode.BICUBIC if interpolation == "bicubic" else tvF.InterpolationMode.BILINEAR
    tensor = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    resized = tvF.resize(tensor[None], [height, width], interpolation=mode, antialias=True)[0]
    return resized.permute(1, 2, 0).numpy()


def _crop_or_pad(pixels: np.ndarray, crop: int, style: str) -> np.ndarray:
    """The centre ``crop x crop`` of uint8 ``H x W x 3`` pixels, padded with black where smaller."""
    h, w = pixels.shape[:2]
    left, top = crop_box(w, h, crop, style)
    out = np.zeros((crop, crop, 3), dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + crop, w), min(top + crop, h)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
    return out


def _torchvision_geometry(image: Image.Image, size: tuple[int, int], crop: int, interpolation: str) -> np.ndarray:
    """torchvision's ``Resize`` + ``CenterCrop`` on a PIL image: PIL resampling, crop offsets rounded."""
    from PIL import Image

    if size != image.size:
        resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
        image = image.resize(size, resample)
    return _crop_or_pad(np.asarray(image, dtype=np.uint8), crop, "torchvision")


def _timm_geometry(image: Image.Image, size: tuple[int, int], crop: int, interpolation: str,
                   fill: tuple[int, ...]) -> np.ndarray:
    """timm's eval geometry: the PIL resize, then timm's ``CenterCropOrPad``: padded with ``fill`` (the smaller
    half before) where smaller than the crop, then center cropped with rounded offsets."""
    from PIL import Image

    if size != image.size:
        resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
        image = image.resize(size, resample)
    pixels = np.asarray(image, dtype=np.uint8)
    h, w = pixels.shape[:2]
    if crop > h or crop > w:
        padded = np.empty((max(h, crop), max(w, crop), 3), dtype=np.uint8)
        padded[:] = np.asarray(fill, dtype=np.uint8)
        top, left = max(crop - h, 0) // 2, max(crop - w, 0) // 2
        padded[top:top + h, left:left + w] = pixels
        pixels = padded
    return _crop_or_pad(pixels, crop, "torchvision")


def _transformers_geometry(image: Image.Image, size: tuple[int, int], crop: int, interpolation: str) -> np.ndarray:
    """transformers' torchvision backend: the uint8 tensor resized by torchvision, crop offsets truncated."""
    pixels = tensor_resize(np.asarray(image, dtype=np.uint8), size[0], size[1], interpolation)
    return _crop_or_pad(pixels, crop, "transformers")
