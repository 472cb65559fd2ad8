"""Applying drawn transforms: a batch on its device, one tensor, one PIL image, or a recorded ``tcac_cases`` row.

:func:`transform_batch` is the function the TCAC model actor applies to its batches: the paper's transforms go to
the batched kernels of :mod:`clipaudit.transforms.kernels`, graded corruptions to
:mod:`clipaudit.transforms.severities`. :func:`recreate_transformed` re-creates the pixels TCAC scored from a
row's recorded ``params`` and ``settings`` (what the report shows and what ``clipaudit score`` re-embeds).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from clipaudit.transforms.draw import generator_for, sample_params
from clipaudit.transforms.kernels import geometric_batch
from clipaudit.transforms.params import TransformParams
from clipaudit.transforms.severities import corrupt_batch, is_graded

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clipaudit.models import Preprocess


def transform_batch(images: torch.Tensor, name: str, drawn: Sequence[dict[str, Any]],
                    params: TransformParams) -> list[torch.Tensor]:
    """Apply transform ``name`` to a uint8 ``(N, 3, H, W)`` stack, row ``i`` with the parameters ``drawn[i]`` of
    :func:`~clipaudit.transforms.draw.sample_params`, on the stack's device; the N transformed ``(3, H', W')``
    images (the input's size, except a rotation with ``expand``)."""
    if is_graded(name):
        return corrupt_batch(images, name, drawn)
    return geometric_batch(images, name, drawn, params)


def apply_params(image: torch.Tensor, name: str, drawn: dict[str, Any], params: TransformParams) -> torch.Tensor:
    """Apply transform ``name`` with the parameters ``drawn`` by :func:`sample_params` to one uint8 ``(3, H, W)``
    tensor: :func:`transform_batch` on a stack of one, on the tensor's device."""
    return transform_batch(image.unsqueeze(0), name, [drawn], params)[0]


def transform_image(image: Image.Image, name: str, params: TransformParams, seed: int,
                    image_id: str) -> tuple[Image.Image, dict[str, Any]]:
    """Transform an RGB PIL image as TCAC does for (seed, image_id, name): (the new image, the drawn params).

    Deterministic: the same arguments give the same pixels and parameters on any machine.
    """
    from torchvision.transforms.v2 import functional as F

    tensor = F.pil_to_tensor(image.convert("RGB") if image.mode != "RGB" else image)
    drawn = sample_params(name, params, tensor.shape[-2], tensor.shape[-1], generator_for(seed, image_id, name))
    out = apply_params(tensor, name, drawn, params)
    return F.to_pil_image(out.contiguous()), drawn


def transform_params_from(transform: str, settings_json: str | None, fallback: TransformParams) -> TransformParams:
    """The configured parameters a ``tcac_cases`` row was made with (its ``settings`` JSON), or ``fallback`` where
    the row does not say or says something this version cannot read (a graded corruption has none)."""
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
    :func:`apply_params`."""
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as F

    from clipaudit.model_view import resize_for_model

    drawn = json.loads(params_json or "{}")
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    pixels = resize_for_model(rgb, model_input) if model_input is not None else np.array(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)
    return F.to_pil_image(apply_params(tensor, transform, drawn, params).contiguous())
