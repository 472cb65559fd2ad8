"""The embed stage's work on one batch, as plain functions and classes (no Ray): testable in-process.

Batches are dicts of numpy arrays (Ray Data's ``numpy`` batch format):

1. :func:`prepare_images` reads each image's bytes once, decodes once (EXIF orientation applied, converted to
   RGB, pixel count bounded) and preprocesses it for every model role that still needs it. An image that cannot
   be used gets ``status`` = a reject reason and a ``detail`` message instead of raising.
2. :class:`ImageEncoder` runs one model over the ``ok`` rows of its role and adds ``vector_<role>``.
3. :class:`TextEncoder` runs the CLIP text tower over caption texts.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.io import fs

if TYPE_CHECKING:
    from PIL import Image

    from clipaudit.models import Preprocess, ResolvedModel

Batch = dict[str, np.ndarray]
OK = "ok"
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                     b"RIFF")


class ImageRejected(Exception):
    """An image that cannot be embedded; ``reason`` is the reject code, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_image_bytes(uri: str) -> bytes:
    """Read an image's bytes; a missing file or an empty one is an :class:`ImageRejected`."""
    try:
        data = fs.read_bytes(uri)
    except FileNotFoundError as exc:
        raise ImageRejected("missing", f"file not found: {uri}") from exc
    except OSError as exc:
        raise ImageRejected("unreadable", f"{uri}: {exc}") from exc
    if not data:
        raise ImageRejected("zero_bytes", f"{uri}: the file is empty")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image: EXIF orientation applied, alpha composited on white,
    16-bit, palette and CMYK images converted; more than ``max_pixels`` pixels is rejected before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("too_large",
                                    f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
            image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        if data.startswith(_IMAGE_SIGNATURES):
            raise ImageRejected("undecodable", f"has an image signature but cannot be decoded: {exc}") from exc
        raise ImageRejected("not_an_image", f"not a recognised image format ({len(data)} bytes)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "undecodable"
        raise ImageRejected(reason, f"{type(exc).__name__}: {exc}") from exc
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on a white background."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def prepare_images(batch: Batch, preprocessors: dict[str, Preprocess], max_pixels: int) -> Batch:
    """Read, decode and preprocess a batch of images once for every model role.

    Input columns: ``image_id``, ``uri`` and ``need_<role>`` (bool) for each role in ``preprocessors``.
    Output adds ``status`` (``ok`` or a reject reason), ``detail``, ``pixels_<role>`` (zeros where not
    needed or rejected) and per-row seconds ``t_read`` / ``t_decode``.
    """
    n = len(batch["image_id"])
    status = np.full(n, OK, dtype=object)
    detail = np.full(n, "", dtype=object)
    t_read = np.zeros(n, dtype=np.float64)
    t_decode = np.zeros(n, dtype=np.float64)
    pixels = {role: _empty_pixels(p, n) for role, p in preprocessors.items()}
    for i in range(n):
        start = time.perf_counter()
        timer = t_read
        try:
            data = read_image_bytes(str(batch["uri"][i]))
            t_read[i] = time.perf_counter() - start
            start, timer = time.perf_counter(), t_decode
            image = decode_image(data, max_pixels)
            for role, preprocess in preprocessors.items():
                if bool(batch[f"need_{role}"][i]):
                    pixels[role][i] = preprocess(image)
        except ImageRejected as exc:
            status[i], detail[i] = exc.reason, str(exc)
        timer[i] = time.perf_counter() - start
    out = dict(batch)
    out.update(status=status, detail=detail, t_read=t_read, t_decode=t_decode)
    out.update({f"pixels_{role}": array for role, array in pixels.items()})
    return out


def _empty_pixels(preprocess: Preprocess, n: int) -> np.ndarray:
    return np.zeros((n, *preprocess.output_shape), dtype=preprocess.output_dtype)


def torch_threads_for(cpus: float, requested: int = 0) -> int:
    """Intra-op threads for a CPU actor: the requested count, else its CPU share rounded up."""
    return requested if requested > 0 else max(1, math.ceil(cpus))


class ImageEncoder:
    """Embeds the ``ok`` rows of one role's pixels; a callable class so Ray can host it in an actor pool.

    The model is loaded once, when the encoder is built (once per actor).
    """

    def __init__(self, model: ResolvedModel, role: str, device: str = "cpu", threads: int = 0) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.role = role
        self.model = model.load(device)

    def __call__(self, batch: Batch) -> Batch:
        """Add ``vector_<role>`` (zeros for rows not embedded) and ``t_infer_<role>``; drop the pixels."""
        start = time.perf_counter()
        pixels = batch.pop(f"pixels_{self.role}")
        use = (batch["status"] == OK) & batch[f"need_{self.role}"].astype(bool)
        vectors = np.zeros((len(pixels), self.model.dim), dtype=np.float32)
        if use.any():
            vectors[use] = self.model.encode_images(pixels[use])
        out = dict(batch)
        out[f"vector_{self.role}"] = vectors
        out[f"t_infer_{self.role}"] = np.full(len(pixels), (time.perf_counter() - start) / max(len(pixels), 1))
        return out


class TextEncoder:
    """Embeds caption texts with the CLIP text tower; a callable class for a Ray actor pool."""

    def __init__(self, model: ResolvedModel, device: str = "cpu", threads: int = 0) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.model = model.load(device)

    def __call__(self, batch: Batch) -> Batch:
        """Add ``vector`` for the ``text`` column and ``t_infer`` per row."""
        start = time.perf_counter()
        texts = [str(t) for t in batch["text"]]
        out: dict[str, Any] = dict(batch)
        out["vector"] = self.model.encode_texts(texts).astype(np.float32)
        out["t_infer"] = np.full(len(texts), (time.perf_counter() - start) / max(len(texts), 1))
        return out
