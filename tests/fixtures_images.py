"""Generated image fixtures: good images and every kind of bad one the embed stage must reject or repair."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = "ok"


def _rgb(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 60x30 JPEG whose EXIF orientation (6: rotate 90 CW) makes it 30x60 when displayed."""
    image = _rgb(7, (60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(image, exif=exif.tobytes())


def huge_png(width: int = 9000, height: int = 9000) -> bytes:
    """A small file with a huge pixel count (a solid colour compresses to almost nothing)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_zoo(folder: Path) -> dict[str, tuple[Path, str]]:
    """Write one file per case; returns name -> (path, expected status: ``ok`` or the reject reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[bytes, str]] = {}
    cases["plain.jpg"] = (_jpeg_bytes(_rgb(1)), GOOD)
    buffer = io.BytesIO()
    _rgb(2).convert("CMYK").save(buffer, format="JPEG")
    cases["cmyk.jpg"] = (buffer.getvalue(), GOOD)
    buffer = io.BytesIO()
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).save(buffer, format="PNG")
    cases["gray16.png"] = (buffer.getvalue(), GOOD)
    buffer = io.BytesIO()
    rgba = _rgb(3).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))
    rgba.save(buffer, format="PNG")
    cases["alpha.png"] = (buffer.getvalue(), GOOD)
    cases["exif_rotated.jpg"] = (exif_rotated_jpeg(), GOOD)
    buffer = io.BytesIO()
    _rgb(4).convert("P").save(buffer, format="GIF")
    cases["palette.gif"] = (buffer.getvalue(), GOOD)
    full = _jpeg_bytes(_rgb(5, (200, 200)))
    cases["truncated.jpg"] = (full[: len(full) // 2], "truncated")
    cases["zero.jpg"] = (b"", "zero_bytes")
    cases["text.jpg"] = (b"this is not an image, just some text\n" * 10, "not_an_image")
    cases["corrupt.png"] = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + b"\x00" * 40, "undecodable")
    cases["huge.png"] = (huge_png(), "too_large")
    paths = {}
    for name, (data, expected) in cases.items():
        path = folder / name
        path.write_bytes(data)
        paths[name] = (path, expected)
    paths["missing.jpg"] = (folder / "missing.jpg", "missing")
    return paths
