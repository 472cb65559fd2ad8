"""Drawing a transform's random parameters for one image, seeded per (seed, image_id, transform).

Randomness never touches torch's global generator. For every (seed, image_id, transform) a
:class:`torch.Generator` is seeded from a stable hash (:func:`seed_for`) and the parameters are drawn from it with
the distributions of the ``torchvision.transforms.v2`` classes (``RandomRotation``, ``RandomAffine``,
``RandomHorizontalFlip``, ``RandomInvert``, ``RandomPerspective``, ``ElasticTransform``, ``Grayscale``); a graded
corruption draws its level's value and, for noise, a noise seed (:mod:`clipaudit.transforms.severities`). The
result is JSON-able data that, with the configured parameters, fully determines the output.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from clipaudit.transforms.params import TransformParams
from clipaudit.transforms.severities import is_graded, sample_corruption

if TYPE_CHECKING:
    import torch


def seed_for(seed: int, image_id: str, transform: str) -> int:
    """A stable 63-bit seed for (seed, image_id, transform): the same on every machine and in every run."""
    digest = hashlib.sha256(f"{seed}\x1f{image_id}\x1f{transform}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator_for(seed: int, image_id: str, transform: str) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded by :func:`seed_for`."""
    import torch

    return torch.Generator().manual_seed(seed_for(seed, image_id, transform))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    import torch

    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    import torch

    return int(torch.randint(low, high, (1,), generator=generator).item())


def _coin(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p``, drawn as ``v2`` does (``torch.rand(1) >= p`` skips)."""
    import torch

    return bool(torch.rand(1, generator=generator).item() < p)


def sample_params(name: str, params: TransformParams, height: int, width: int,
                  generator: torch.Generator) -> dict[str, Any]:
    """Draw the parameters of transform ``name`` for an image of ``height x width`` pixels.

    The distributions are those of the matching ``torchvision.transforms.v2`` class. The result is plain
    JSON-able data and, with ``params``, fully determines :func:`~clipaudit.transforms.apply.apply_params`. A
    graded corruption (``gaussian_blur@3``) draws as :func:`~clipaudit.transforms.severities.sample_corruption`.
    """
    if is_graded(name):
        return sample_corruption(name, height, width, generator)
    config = params.of(name)
    if name == "grayscale":
        return {}
    if name in ("hflip", "invert"):
        return {"applied": _coin(generator, config.p)}
    if name == "rotation":
        return {"angle": _uniform(generator, -config.degrees, config.degrees)}
    if name == "affine":
        angle = _uniform(generator, -config.degrees, config.degrees)
        max_dx, max_dy = float(config.translate[0] * width), float(config.translate[1] * height)
        translate = [int(round(_uniform(generator, -max_dx, max_dx))), int(round(_uniform(generator, -max_dy, max_dy)))]
        scale = _uniform(generator, config.scale[0], config.scale[1])
        shear = [_uniform(generator, -config.shear, config.shear), 0.0]
        return {"angle": angle, "translate": translate, "scale": scale, "shear": shear}
    if name == "perspective":
        if not _coin(generator, config.p):
            return {"applied": False}
        bound_h = int(config.distortion_scale * (height // 2)) + 1
        bound_w = int(config.distortion_scale * (width // 2)) + 1
        top_left = [_randint(generator, 0, bound_w), _randint(generator, 0, bound_h)]
        top_right = [_randint(generator, width - bound_w, width), _randint(generator, 0, bound_h)]
        bottom_right = [_randint(generator, width - bound_w, width), _randint(generator, height - bound_h, height)]
        bottom_left = [_randint(generator, 0, bound_w), _randint(generator, height - bound_h, height)]
        return {"applied": True,
                "startpoints": [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                "endpoints": [top_left, top_right, bottom_right, bottom_left]}
    if name == "elastic":
        return {"field_seed": _randint(generator, 0, 2**62)}
    raise KeyError(name)


def params_json(drawn: dict[str, Any]) -> str:
    """The drawn parameters as canonical JSON (the ``params`` column)."""
    return json.dumps(drawn, sort_keys=True)
