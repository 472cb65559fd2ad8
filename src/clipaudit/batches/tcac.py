"""The tcac stage's work on one batch, as plain functions and classes (no Ray): testable in-process.

1. :func:`prepare_resized` (a CPU task) reads and decodes each image once (as the embed stage does), resizes it
   as the CLIP model's preprocessing does, stopping before the centre crop
   (:func:`clipaudit.model_view.resize_for_model`), and draws the parameters of every transform the image still
   needs (:func:`clipaudit.transforms.sample_params`, for that resized size): one row per image with its uint8
   pixels and the drawn parameters.
2. :class:`TransformedEncoder` (the CLIP actor) expands each image into its (image, transform) rows (with the
   identity, ``original``, where the image's CLIP vector is not stored yet), applies the transforms as batched
   tensor operations on the actor's device (:func:`clipaudit.transforms.transform_batch`, one call per
   transform and image size), centre-crops, preprocesses exactly as the embed stage does, embeds, and hands back
   the model's ``logit_scale`` so the driver can turn cosines into CLIP probabilities.

Nothing here raises for one bad row. An image that cannot be read, decoded or resized gets ``status`` = a reject
reason on all its rows; a transform or a forward that raises (or gives a non-finite or misshapen vector) is split
in halves down to the rows that fail alone (:func:`clipaudit.batches.isolation.run_isolated`), which get
``status`` ``transform_failed`` or ``forward_failed`` (``detail``: the transform, the exception type and its
message); the rest of the batch goes on.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.batches.embed import FORWARD_FAILED, Batch, ImageEncoder
from clipaudit.batches.isolation import describe, run_isolated, stack_vectors
from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes
from clipaudit.model_view import center_crop_or_pad, model_inputs, resize_for_model
from clipaudit.records import OK
from clipaudit.transforms import generator_for, params_json, sample_params

if TYPE_CHECKING:
    import torch

    from clipaudit.config import TcacConfig
    from clipaudit.models import Preprocess, ResolvedModel

ROLE = "clip"
ORIGINAL = "original"
"""The identity transform: the untransformed image, embedded only where ``image_embeddings_clip`` lacks it."""
PREPARE_FAILED = "prepare_failed"
TRANSFORM_FAILED = "transform_failed"
_PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)


def images_per_task(batch_size: int, transforms_per_image: int) -> int:
    """Images per CPU task (and per actor batch) so that one yields about ``batch_size`` (image, transform) rows."""
    return max(1, batch_size // max(1, transforms_per_image))


def draw_all(names: list[str], tcac: TcacConfig, image_id: str, height: int, width: int) -> list[dict[str, Any]]:
    """The drawn parameters of each transform in ``names`` (``{}`` for the identity) for an image of that size."""
    return [{} if name == ORIGINAL else
            sample_params(name, tcac.params, height, width, generator_for(tcac.seed, image_id, name))
            for name in names]


def prepare_resized(batch: Batch, preprocess: Preprocess, tcac: TcacConfig, max_pixels: int) -> Batch:
    """Read, decode and resize each image once (before the model's crop) and draw its transforms' parameters.

    Input columns: ``image_id``, ``uri``, ``transforms`` (comma-separated names, ``original`` for the identity).
    Output, one row per image: ``image_id``, ``transforms``, ``params`` (a JSON list of the drawn parameters, one
    per transform), ``status`` (``ok`` or a reject reason), ``detail``, ``pixels`` (the resized uint8 ``H x W x 3``
    image; a 1 x 1 placeholder where rejected) and the seconds ``t_read``, ``t_decode``, ``t_resize``.
    """
    n = len(batch["image_id"])
    out: dict[str, np.ndarray] = {
        "image_id": np.asarray([str(i) for i in batch["image_id"]], dtype=object),
        "transforms": np.asarray([str(t) for t in batch["transforms"]], dtype=object),
        "params": np.full(n, "[]", dtype=object), "status": np.full(n, OK, dtype=object),
        "detail": np.full(n, "", dtype=object), "pixels": np.empty(n, dtype=object),
    }
    times = {phase: np.zeros(n, dtype=np.float64) for phase in ("t_read", "t_decode", "t_resize")}
    for i in range(n):
        out["pixels"][i] = _PLACEHOLDER
        phase, start = "t_read", time.perf_counter()
        try:
            data = read_image_bytes(str(batch["uri"][i]))
            times[phase][i] = time.perf_counter() - start
            phase, start = "t_decode", time.perf_counter()
            image = decode_image(data, max_pixels)
            times[phase][i] = time.perf_counter() - start
            phase, start = "t_resize", time.perf_counter()
            resized = resize_for_model(image, preprocess)
            names = [name for name in out["transforms"][i].split(",") if name]
            drawn = draw_all(names, tcac, out["image_id"][i], resized.shape[0], resized.shape[1])
            out["params"][i] = json.dumps(drawn)
            out["pixels"][i] = np.ascontiguousarray(resized)
        except ImageRejected as exc:
            out["status"][i], out["detail"][i] = exc.reason, str(exc)
        except Exception as exc:  # noqa: BLE001 - one image must not fail the task
            out["status"][i], out["detail"][i] = PREPARE_FAILED, describe(exc, phase.removeprefix("t_"))
        times[phase][i] = time.perf_counter() - start
    out.update(times)
    return out


class _Rows:
    """The (image, transform) rows of one actor batch, as parallel lists."""

    def __init__(self, batch: Batch) -> None:
        self.image: list[int] = []
        self.name: list[str] = []
        self.drawn: list[dict[str, Any]] = []
        self.status: list[str] = []
        self.detail: list[str] = []
        self.first: list[bool] = []
        for i in range(len(batch["image_id"])):
            names = [name for name in str(batch["transforms"][i]).split(",") if name]
            status, detail = str(batch["status"][i]), str(batch["detail"][i])
            drawn = json.loads(str(batch["params"][i])) if status == OK else [{} for _ in names]
            for position, (name, params) in enumerate(zip(names, drawn, strict=True)):
                self.image.append(i)
                self.name.append(name)
                self.drawn.append(params)
                self.status.append(status)
                self.detail.append(detail)
                self.first.append(position == 0)

    def __len__(self) -> int:
        return len(self.image)

    def reject(self, row: int, reason: str, detail: str) -> None:
        """Mark one row as failed."""
        self.status[row], self.detail[row] = reason, detail


class TransformedEncoder(ImageEncoder):
    """The CLIP actor over :func:`prepare_resized` rows: expands them to (image, transform) rows, transforms in
    batches on its device, crops, preprocesses, embeds; adds the model's ``logit_scale`` column."""

    def __init__(self, model: ResolvedModel, tcac: TcacConfig, device: str = "cpu", threads: int = 0) -> None:
        super().__init__(model, ROLE, device, threads)
        self.tcac = tcac
        self.preprocess = model.preprocess
        self.device = device

    def __call__(self, batch: Batch) -> Batch:
        """One output row per (image, transform): ``image_id``, ``transform``, ``params`` (JSON of the drawn
        parameters), ``status``, ``detail``, ``vector_clip``, ``logit_scale`` and the seconds ``t_read``,
        ``t_decode``, ``t_resize`` (on the image's first row), ``t_transform`` and ``t_infer_clip``."""
        rows = _Rows(batch)
        n = len(rows)
        t_transform = np.zeros(n, dtype=np.float64)
        squares = self._transform(batch, rows, t_transform)
        start = time.perf_counter()
        vectors = self._encode(rows, squares)
        t_infer = (time.perf_counter() - start) / max(n, 1)
        out: Batch = {
            "image_id": np.asarray([str(batch["image_id"][i]) for i in rows.image], dtype=object),
            "transform": np.asarray(rows.name, dtype=object),
            "params": np.asarray([params_json(d) for d in rows.drawn], dtype=object),
            "status": np.asarray(rows.status, dtype=object),
            "detail": np.asarray(rows.detail, dtype=object),
            "t_transform": t_transform,
            f"vector_{ROLE}": vectors,
            f"t_infer_{ROLE}": np.full(n, t_infer, dtype=np.float64),
            "logit_scale": np.full(n, float(self.model.logit_scale), dtype=np.float64),
            "logit_bias": np.full(n, float(getattr(self.model, "logit_bias", float("nan"))), dtype=np.float64),
        }
        for phase in ("t_read", "t_decode", "t_resize"):
            values = np.asarray(batch[phase], dtype=np.float64)
            out[phase] = np.asarray([values[i] if first else 0.0 for i, first in zip(rows.image, rows.first)],
                                    dtype=np.float64)
        return out

    def _synchronize(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def _transform(self, batch: Batch, rows: _Rows, seconds: np.ndarray) -> np.ndarray:
        """The model-size uint8 ``(n, S, S, 3)`` squares of every row (zeros where failed); ``seconds`` gets each
        row's share of its transform call plus its crop."""
        import torch

        size, style = self.preprocess.image_size, self.preprocess.style
        squares = torch.zeros(len(rows), 3, size, size, dtype=torch.uint8, device=self.device)
        images: dict[int, torch.Tensor] = {}
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for row in range(len(rows)):
            if rows.status[row] != OK:
                continue
            i = rows.image[row]
            if i not in images:
                images[i] = torch.from_numpy(np.array(batch["pixels"][i], dtype=np.uint8)).permute(2, 0, 1).to(
                    self.device)
            groups.setdefault((rows.name[row], tuple(images[i].shape)), []).append(row)
        for (name, _), members in groups.items():
            start = time.perf_counter()
            stack = torch.stack([images[rows.image[row]] for row in members])
            outputs = self._apply(name, stack, members, rows)
            for row, image in zip(members, outputs):
                if image is not None:
                    squares[row] = center_crop_or_pad(image, size, style)
            self._synchronize()
            seconds[members] += (time.perf_counter() - start) / len(members)
        return squares.permute(0, 2, 3, 1).cpu().numpy()

    def _apply(self, name: str, stack: torch.Tensor, members: list[int],
               rows: _Rows) -> list[torch.Tensor | None]:
        """Transform a stack in one call; if that raises, split in halves, rejecting the rows that raise alone."""
        from clipaudit.transforms import transform_batch

        if name == ORIGINAL:
            return list(stack.unbind(0))
        found = run_isolated(lambda part: transform_batch(stack[part.tolist()], name,
                                                          [rows.drawn[members[p]] for p in part], self.tcac.params),
                             len(members))
        for position, exc in found.errors.items():
            rows.reject(members[position], TRANSFORM_FAILED, describe(exc, name))
        return found.results

    def _encode(self, rows: _Rows, squares: np.ndarray) -> np.ndarray:
        """Vectors of the ``ok`` rows (zeros elsewhere): preprocessed as the embed stage does, one forward; if it
        raises, split in halves, rejecting the rows that fail alone."""
        vectors = np.zeros((len(rows), self.model.dim), dtype=np.float32)
        use = np.flatnonzero(np.asarray([status == OK for status in rows.status], dtype=bool))
        if not len(use):
            return vectors
        found = run_isolated(lambda part: self.forward(model_inputs(squares[use[part]], self.preprocess)), len(use))
        vectors[use] = stack_vectors(found, self.model.dim)
        for position, exc in found.errors.items():
            rows.reject(int(use[position]), FORWARD_FAILED, describe(exc, "forward"))
        return vectors
