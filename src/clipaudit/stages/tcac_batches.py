"""The tcac stage's work on one batch, as plain functions and classes (no Ray): testable in-process.

1. :func:`prepare_transformed` reads and decodes each image once (as the embed stage does), applies every
   transform the image still needs (and the identity, ``original``, where its CLIP vector is not stored yet),
   and preprocesses each result for the CLIP model: one output row per (image, transform).
2. :class:`TransformedEncoder` is the embed stage's CLIP :class:`ImageEncoder` over those rows; it also hands
   back the model's ``logit_scale`` so the driver can turn cosines into CLIP probabilities.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.stages.embed_batches import OK, Batch, ImageEncoder, ImageRejected, decode_image, read_image_bytes
from clipaudit.transforms import params_json, transform_image

if TYPE_CHECKING:
    from clipaudit.config import TcacConfig
    from clipaudit.models import Preprocess, ResolvedModel

ROLE = "clip"
ORIGINAL = "original"
"""The identity transform: the untransformed image, embedded only where ``image_embeddings_clip`` lacks it."""


def images_per_task(batch_size: int, transforms_per_image: int) -> int:
    """Images per CPU task so that one task yields about ``batch_size`` (image, transform) rows."""
    return max(1, batch_size // max(1, transforms_per_image))


def prepare_transformed(batch: Batch, preprocess: Preprocess, tcac: TcacConfig, max_pixels: int) -> Batch:
    """Decode each image once, transform it, preprocess every result.

    Input columns: ``image_id``, ``uri``, ``transforms`` (comma-separated names, ``original`` for the identity).
    Output: one row per (image, transform) with ``image_id``, ``transform``, ``params`` (JSON of the drawn
    parameters), ``status`` (``ok`` or a reject reason), ``detail``, ``need_clip``, ``pixels_clip`` and the
    seconds ``t_read`` / ``t_decode`` (on the image's first row) and ``t_transform``.
    """
    out: dict[str, list] = {name: [] for name in ("image_id", "transform", "params", "status", "detail",
                                                  "t_read", "t_decode", "t_transform")}
    pixels: list[np.ndarray] = []
    empty = np.zeros(preprocess.output_shape, dtype=preprocess.output_dtype)
    for image_id, uri, names in zip(batch["image_id"], batch["uri"], batch["transforms"]):
        image_id = str(image_id)
        todo = [name for name in str(names).split(",") if name]
        t_read = t_decode = 0.0
        start = time.perf_counter()
        try:
            data = read_image_bytes(str(uri))
            t_read = time.perf_counter() - start
            start = time.perf_counter()
            image = decode_image(data, max_pixels)
            t_decode = time.perf_counter() - start
        except ImageRejected as exc:
            for name in todo:
                _append(out, image_id, name, "{}", exc.reason, str(exc), 0.0, 0.0, 0.0)
                pixels.append(empty)
            continue
        for position, name in enumerate(todo):
            start = time.perf_counter()
            if name == ORIGINAL:
                result, drawn = image, {}
            else:
                result, drawn = transform_image(image, name, tcac.params, tcac.seed, image_id)
            pixels.append(preprocess(result))
            first = position == 0
            _append(out, image_id, name, params_json(drawn), OK, "", t_read if first else 0.0,
                    t_decode if first else 0.0, time.perf_counter() - start)
    n = len(out["image_id"])
    result_batch: Batch = {name: np.asarray(values, dtype=object) for name, values in out.items()
                           if not name.startswith("t_")}
    result_batch.update({name: np.asarray(values, dtype=np.float64) for name, values in out.items()
                         if name.startswith("t_")})
    result_batch[f"need_{ROLE}"] = np.ones(n, dtype=bool)
    result_batch[f"pixels_{ROLE}"] = (np.stack(pixels) if pixels
                                      else np.zeros((0, *preprocess.output_shape), dtype=preprocess.output_dtype))
    return result_batch


def _append(out: dict[str, list], image_id: str, name: str, params: str, status: str, detail: str,
            t_read: float, t_decode: float, t_transform: float) -> None:
    for key, value in (("image_id", image_id), ("transform", name), ("params", params), ("status", status),
                       ("detail", detail), ("t_read", t_read), ("t_decode", t_decode), ("t_transform", t_transform)):
        out[key].append(value)


class TransformedEncoder(ImageEncoder):
    """The CLIP :class:`ImageEncoder` over (image, transform) rows; adds the model's ``logit_scale`` column."""

    def __init__(self, model: ResolvedModel, device: str = "cpu", threads: int = 0) -> None:
        super().__init__(model, ROLE, device, threads)

    def __call__(self, batch: Batch) -> Batch:
        """Add ``vector_clip``, ``t_infer_clip`` and ``logit_scale``; drop the pixels."""
        out = super().__call__(batch)
        out["logit_scale"] = np.full(len(out["image_id"]), float(self.model.logit_scale), dtype=np.float64)
        return out
