"""Reading and decoding an image as every part of the audit does: embed, TCAC, the report, ``export``, ``score``.

:func:`read_image_bytes` reads a URI's bytes (a missing or empty file is a reject, not a crash);
:func:`decode_image` decodes them to 8-bit RGB with the EXIF orientation applied, bounding the pixel count before
decoding. A failure is an :class:`ImageRejected` whose ``reason`` is the reject code the tables record
(``missing``, ``zero_bytes``, ``unreadable``, ``not_an_image``, ``truncated``, ``undecodable``, ``too_large``).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.io import fs

if TYPE_CHECKING:
    from PIL import Image

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
