"""The embed stage's work on one batch, as plain functions and classes (no Ray): testable in-process.

Batches are dicts of numpy arrays (Ray Data's ``numpy`` batch format):

1. :func:`prepare_images` reads each image's bytes once, decodes once (EXIF orientation applied, converted to
   RGB, pixel count bounded) and preprocesses it for every model role that still needs it.
2. :class:`ImageEncoder` runs one model over the ``ok`` rows of its role and adds ``vector_<role>``;
   :class:`ImageEncoders` runs every model of the pass, one after another, in one actor.
3. :class:`TextEncoder` runs one CLIP-role model's text tower over the caption texts that need it
   (``need_<slot>``) and adds ``vector_<slot>``; :class:`TextEncoders` runs every text tower of a caption pass in
   one actor.

Nothing here raises for one bad row: a row that fails gets ``status`` = a reject reason and ``detail`` = what
failed, the exception's type and its message, and the rest of the batch goes on. Reading, decoding and
preprocessing are per row (``missing``, ``zero_bytes``, ``not_an_image``, ``truncated``, ``undecodable``,
``too_large``; any other exception: ``unreadable``, ``undecodable`` or ``preprocess_failed``); a forward that
raises, or gives a non-finite or misshapen vector, is split in halves down to the rows that fail alone
(:func:`clipaudit.batches.isolation.run_isolated`), which become ``forward_failed``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.batches.isolation import describe, run_isolated, stack_vectors
from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes
from clipaudit.records import OK

if TYPE_CHECKING:

    from clipaudit.models import Preprocess, ResolvedModel

Batch = dict[str, np.ndarray]
FORWARD_FAILED = "forward_failed"
PREPROCESS_FAILED = "preprocess_failed"
_PHASE_REASONS = {"read": "unreadable", "decode": "undecodable", "preprocess": PREPROCESS_FAILED}


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
        timer, phase = t_read, "read"
        try:
            data = read_image_bytes(str(batch["uri"][i]))
            t_read[i] = time.perf_counter() - start
            start, timer, phase = time.perf_counter(), t_decode, "decode"
            image = decode_image(data, max_pixels)
            for role, preprocess in preprocessors.items():
                if bool(batch[f"need_{role}"][i]):
                    phase = "preprocess"
                    pixels[role][i] = preprocess(image)
        except ImageRejected as exc:
            status[i], detail[i] = exc.reason, str(exc)
        except Exception as exc:  # noqa: BLE001 - one image must not fail the batch
            status[i], detail[i] = _PHASE_REASONS[phase], describe(exc, phase)
        timer[i] = time.perf_counter() - start
    out = dict(batch)
    out.update(status=status, detail=detail, t_read=t_read, t_decode=t_decode)
    out.update({f"pixels_{role}": array for role, array in pixels.items()})
    return out


def _empty_pixels(preprocess: Preprocess, n: int) -> np.ndarray:
    return np.zeros((n, *preprocess.output_shape), dtype=preprocess.output_dtype)


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
        use = np.flatnonzero((batch["status"] == OK) & batch[f"need_{self.role}"].astype(bool))
        vectors = np.zeros((len(pixels), self.model.dim), dtype=np.float32)
        out = dict(batch)
        if len(use):
            found = run_isolated(lambda part: self.forward(pixels[use[part]]), len(use))
            vectors[use] = stack_vectors(found, self.model.dim)
            if found.errors:
                out["status"], out["detail"] = batch["status"].copy(), batch["detail"].copy()
                for position, exc in found.errors.items():
                    out["status"][use[position]] = FORWARD_FAILED
                    out["detail"][use[position]] = describe(exc, f"forward ({self.role})")
        out[f"vector_{self.role}"] = vectors
        out[f"t_infer_{self.role}"] = np.full(len(pixels), (time.perf_counter() - start) / max(len(pixels), 1))
        return out

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """The model's vectors of preprocessed ``pixels``; raises when they are misshapen or not finite."""
        return checked_vectors(self.model.encode_images(pixels), len(pixels), self.model.dim)


def checked_vectors(vectors: Any, rows: int, dim: int) -> np.ndarray:
    """``vectors`` as float32 ``(rows, dim)``; ValueError when the shape differs, FloatingPointError when a value is
    NaN or infinite (such a row is a reject, never a stored vector)."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.shape != (rows, dim):
        raise ValueError(f"the model returned shape {array.shape}, expected {(rows, dim)}")
    if not np.isfinite(array).all():
        raise FloatingPointError("the model returned NaN or infinite values")
    return array


class ImageEncoders:
    """Every model of an image pass in one actor (``embed.actor_pools: shared``; with ``per_model`` each pool's
    actors host one): each loaded once, when the encoders are built, and run one after another over each batch."""

    def __init__(self, models: dict[str, ResolvedModel], device: str = "cpu", threads: int = 0) -> None:
        self.encoders = [ImageEncoder(model, role, device, threads) for role, model in models.items()]

    def __call__(self, batch: Batch) -> Batch:
        """Add every model's ``vector_<role>`` and ``t_infer_<role>`` (see :class:`ImageEncoder`)."""
        for encoder in self.encoders:
            batch = encoder(batch)
        return batch


class TextEncoder:
    """Embeds the ``ok`` caption texts that need one CLIP-role model's text tower; the model is loaded once, when
    the encoder is built."""

    def __init__(self, model: ResolvedModel, slot: str, device: str = "cpu", threads: int = 0) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.slot = slot
        self.model = model.load(device)

    def __call__(self, batch: Batch) -> Batch:
        """Add ``vector_<slot>`` for the ``text`` rows whose ``status`` is ``ok`` (every row where there is no
        ``status`` yet) and whose ``need_<slot>`` is set (every row where there is no such column), zeros elsewhere,
        and the per-row seconds ``t_infer_<slot>``; a text whose forward fails gets ``status`` ``forward_failed``
        (the forward is split down to the texts that fail alone)."""
        start = time.perf_counter()
        texts = [str(t) for t in batch["text"]]
        out: dict[str, Any] = dict(batch)
        out["status"] = np.asarray(batch.get("status", np.full(len(texts), OK, dtype=object))).copy()
        out["detail"] = np.asarray(batch.get("detail", np.full(len(texts), "", dtype=object))).copy()
        need = np.asarray(batch.get(f"need_{self.slot}", np.ones(len(texts), dtype=bool)), dtype=bool)
        use = np.flatnonzero((out["status"] == OK) & need)
        vectors = np.zeros((len(texts), self.model.dim), dtype=np.float32)
        if len(use):
            found = run_isolated(lambda part: checked_vectors(self.model.encode_texts([texts[use[i]] for i in part]),
                                                              len(part), self.model.dim), len(use))
            vectors[use] = stack_vectors(found, self.model.dim)
            for position, exc in found.errors.items():
                out["status"][use[position]] = FORWARD_FAILED
                out["detail"][use[position]] = describe(exc, f"text forward ({self.slot})")
        out[f"vector_{self.slot}"] = vectors
        seconds = np.zeros(len(texts), dtype=np.float64)
        seconds[use] = (time.perf_counter() - start) / max(len(use), 1)
        out[f"t_infer_{self.slot}"] = seconds
        return out


class TextEncoders:
    """Every text tower of a caption pass in one actor (``embed.actor_pools: shared``; with ``per_model`` each
    pool's actors host one), run one after another over each batch: a callable class for a Ray actor pool."""

    def __init__(self, models: dict[str, ResolvedModel], device: str = "cpu", threads: int = 0) -> None:
        self.encoders = [TextEncoder(model, slot, device, threads) for slot, model in models.items()]

    def __call__(self, batch: Batch) -> Batch:
        """Add every model's ``vector_<slot>`` and ``t_infer_<slot>``, and ``status`` / ``detail`` (see
        :class:`TextEncoder`)."""
        for encoder in self.encoders:
            batch = encoder(batch)
        return batch
