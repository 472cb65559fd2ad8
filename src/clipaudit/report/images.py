"""Thumbnails for the report: small JPEG files under ``report/thumbs/``, one per (image, transform) shown.

Images are read and decoded as the embed stage does (:func:`clipaudit.stages.embed_batches.read_image_bytes`,
:func:`~clipaudit.stages.embed_batches.decode_image`: EXIF orientation, RGB, pixel bound). A TCAC image is
re-created from the recorded parameters: the ``params`` column (what was drawn) and the ``settings`` column (the
configured ranges, interpolation and fill, and under ``input`` the model's resize) of ``tcac_cases``. The image is
resized as TCAC resized it (:func:`clipaudit.model_view.resize_for_model`, the model's resolution before its
crop) and transformed by :func:`clipaudit.transforms.apply_params`, the kernel the TCAC actor applies to its
batches: the pixels TCAC scored, shown whole (before the crop); only then is it shrunk. Rows written before
``settings`` recorded the input were transformed at full size, and are re-created so. Work runs in a thread pool
(reads from object stores wait on the network, not the CPU). An image that cannot be read is shown as a grey box,
not a broken image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs
from clipaudit.report.html import Markup, tag
from clipaudit.transforms import TransformParams

if TYPE_CHECKING:
    from PIL import Image

    from clipaudit.models import Preprocess

log = logging.getLogger("clipaudit.report")

THUMBS_DIR = "thumbs"


def write_bytes(path: str, data: bytes) -> None:
    """Write a binary file, local or on an object store (through pyarrow's filesystems, as :mod:`clipaudit.io.fs`)."""
    if fs.is_remote(path):
        import pyarrow.fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(path)
        filesystem.create_dir(posixpath.dirname(inner), recursive=True)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(data)
        return
    local = os.path.abspath(path.removeprefix("file://"))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, local)


def transform_params_from(transform: str, settings_json: str | None, fallback: TransformParams) -> TransformParams:
    """The configured parameters a ``tcac_cases`` row was made with (its ``settings`` JSON), or ``fallback`` where
    the row does not say or says something this version cannot read."""
    try:
        values = json.loads(settings_json or "{}").get("params")
        if not isinstance(values, dict):
            return fallback
        section = type(fallback.of(transform))(**values)
        return dataclasses.replace(fallback, **{transform: section})
    except (ValueError, TypeError, KeyError, AttributeError):
        return fallback


def input_from(settings_json: str | None) -> Preprocess | None:
    """The model resize a ``tcac_cases`` row was transformed after (its ``settings`` JSON's ``input``), as a
    :class:`~clipaudit.models.Preprocess` (its normalisation unused); None where the row does not say."""
    from clipaudit.models import Preprocess

    try:
        values = json.loads(settings_json or "{}").get("input")
        if not isinstance(values, dict):
            return None
        known = {f.name for f in dataclasses.fields(Preprocess)}
        extra = {key: values[key] for key in ("resize_mode", "style") if key in values and key in known}
        return Preprocess(int(values["image_size"]), int(values["resize_size"]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                          str(values["interpolation"]), **extra)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def recreate_transformed(image: Image.Image, transform: str, params_json: str | None,
                         params: TransformParams, model_input: Preprocess | None = None) -> Image.Image:
    """Apply transform ``transform`` with the drawn parameters ``params_json`` (the ``params`` column) to an RGB
    image exactly as TCAC did: resized as ``model_input`` resizes (before its crop; None: at full size), then
    :func:`clipaudit.transforms.apply_params`."""
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as F

    from clipaudit.model_view import resize_for_model
    from clipaudit.transforms import apply_params

    drawn = json.loads(params_json or "{}")
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    pixels = resize_for_model(rgb, model_input) if model_input is not None else np.array(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)
    return F.to_pil_image(apply_params(tensor, transform, drawn, params).contiguous())


def at_display_size(picture: Image.Image, original: Image.Image) -> Image.Image:
    """A transformed picture made at the model's resolution, scaled to the original's size where it has the same
    shape (so its thumbnail matches the original's), else left as it is."""
    from PIL import Image as PILImage

    (w, h), (pw, ph) = original.size, picture.size
    if (pw, ph) == (w, h) or abs(pw * h - ph * w) > 0.02 * w * ph:
        return picture
    return picture.resize((w, h), PILImage.Resampling.BICUBIC)


def shrink(image: Image.Image, long_side: int, quality: int) -> tuple[bytes, int, int]:
    """A JPEG thumbnail whose long side is at most ``long_side`` pixels: (bytes, width, height)."""
    from PIL import Image as PILImage

    thumb = image.convert("RGB")
    thumb.thumbnail((long_side, long_side), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue(), thumb.width, thumb.height


@dataclass(frozen=True)
class ThumbRequest:
    """One thumbnail to make: an image as it is (``transform`` None), or as a TCAC transform left it."""

    image_id: str
    transform: str | None = None
    params: str | None = None
    settings: str | None = None

    @property
    def key(self) -> str:
        """A stable file stem for this request."""
        text = "\x1f".join([self.image_id, self.transform or "", self.params or "", self.settings or ""])
        return hashlib.sha1(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Thumb:
    """A thumbnail written to disk: its path relative to the report folder and its size."""

    src: str
    width: int
    height: int


class Thumbnails:
    """Collects the thumbnails a report wants, makes them in parallel, and renders ``<img>`` tags for them."""

    def __init__(self, report_dir: str, long_side: int = 96, quality: int = 70, max_pixels: int = 64_000_000,
                 workers: int = 8, params: TransformParams | None = None) -> None:
        self.report_dir = report_dir
        self.long_side = long_side
        self.quality = quality
        self.max_pixels = max_pixels
        self.workers = workers
        self.params = params or TransformParams()
        self._wanted: dict[str, ThumbRequest] = {}
        self._made: dict[str, Thumb | None] = {}
        self.failed: dict[str, str] = {}
        self.bytes_written = 0

    def want(self, image_id: str, transform: str | None = None, params: str | None = None,
             settings: str | None = None) -> str:
        """Register a thumbnail; returns its key (for :meth:`img`)."""
        request = ThumbRequest(str(image_id), transform, params, settings)
        self._wanted.setdefault(request.key, request)
        return request.key

    def image_ids(self) -> set[str]:
        """Every image id wanted so far."""
        return {request.image_id for request in self._wanted.values()}

    def make(self, uri_of: Callable[[str], str | None]) -> None:
        """Make every wanted thumbnail not made yet; ``uri_of`` maps an image id to its uri (None: unknown)."""
        todo = [r for key, r in self._wanted.items() if key not in self._made]
        by_image: dict[str, list[ThumbRequest]] = {}
        for request in todo:
            by_image.setdefault(request.image_id, []).append(request)
        jobs = [(image_id, uri_of(image_id), requests) for image_id, requests in by_image.items()]
        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs)))) as pool:
            for results in pool.map(lambda job: self._make_image(*job), jobs):
                self._made.update(results)

    def _make_image(self, image_id: str, uri: str | None,
                    requests: list[ThumbRequest]) -> dict[str, Thumb | None]:
        """Read and decode one image once, then make all its thumbnails (the original and its transforms)."""
        from clipaudit.stages.embed_batches import ImageRejected, decode_image, read_image_bytes

        if uri is None:
            return self._fail(requests, "not in the samples table")
        try:
            image = decode_image(read_image_bytes(uri), self.max_pixels)
        except ImageRejected as exc:
            return self._fail(requests, f"{exc.reason}: {exc}")
        out: dict[str, Thumb | None] = {}
        for request in requests:
            try:
                picture = image
                if request.transform:
                    params = transform_params_from(request.transform, request.settings, self.params)
                    picture = at_display_size(recreate_transformed(image, request.transform, request.params,
                                                                   params, input_from(request.settings)), image)
                data, width, height = shrink(picture, self.long_side, self.quality)
                name = f"{THUMBS_DIR}/{request.key}.jpg"
                write_bytes(fs.join(self.report_dir, *name.split("/")), data)
                self.bytes_written += len(data)
                out[request.key] = Thumb(name, width, height)
            except Exception as exc:  # noqa: BLE001 - one bad thumbnail must not cost the whole report
                log.warning("report: no thumbnail for %s (%s): %s", request.image_id, request.transform or "original",
                            exc)
                self.failed[request.key] = f"{type(exc).__name__}: {exc}"
                out[request.key] = None
        return out

    def _fail(self, requests: Iterable[ThumbRequest], why: str) -> dict[str, Thumb | None]:
        out: dict[str, Thumb | None] = {}
        for request in requests:
            self.failed[request.key] = why
            out[request.key] = None
        return out

    def files(self) -> set[str]:
        """Paths (relative to the report folder) of the thumbnails made."""
        return {thumb.src for thumb in self._made.values() if thumb is not None}

    @property
    def made(self) -> int:
        """Thumbnails written."""
        return sum(1 for thumb in self._made.values() if thumb is not None)

    def img(self, key: str, alt: Any = "", title: Any = None) -> Markup:
        """The ``<img>`` of a made thumbnail, or a grey box saying why there is none."""
        thumb = self._made.get(key)
        if thumb is None:
            why = self.failed.get(key, "not made")
            return tag("div", "image unavailable", class_="thumb-missing", title=why)
        return tag("img", src=thumb.src, width=thumb.width, height=thumb.height, alt=alt, title=title)
