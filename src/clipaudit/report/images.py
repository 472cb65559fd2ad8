"""Thumbnails for the report: small JPEG files under ``report/thumbs/``, one per (image, transform) shown.

Images are read and decoded as the embed stage does (:func:`clipaudit.io.images.read_image_bytes`,
:func:`~clipaudit.io.images.decode_image`: EXIF orientation, RGB, pixel bound). A TCAC image is
re-created from the recorded parameters: the ``params`` column (what was drawn) and the ``settings`` column (the
configured ranges, interpolation and fill, and under ``input`` the model's resize) of ``tcac_cases``. The image is
resized as TCAC resized it (:func:`clipaudit.model_view.resize_for_model`, the model's resolution before its
crop) and transformed by :func:`clipaudit.transforms.recreate_transformed`, the kernel the TCAC actor applies to its
batches: the pixels TCAC scored, shown whole (before the crop); only then is it shrunk. Rows written before
``settings`` recorded the input were transformed at full size, and are re-created so. Work runs in a thread pool
(reads from object stores wait on the network, not the CPU). An image that cannot be read is shown as a grey box,
not a broken image.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs
from clipaudit.report.html import Markup, tag
from clipaudit.transforms import TransformParams, input_from, recreate_transformed, transform_params_from

if TYPE_CHECKING:
    from PIL import Image


log = logging.getLogger("clipaudit.report")

THUMBS_DIR = "thumbs"


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
        from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes

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
                fs.write_bytes(fs.join(self.report_dir, *name.split("/")), data)
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
