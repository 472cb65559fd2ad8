"""The image transforms of Transformative Caption Analysis (TCAC), seeded and reproducible.

Seven transforms, as in the paper's Figure 4: ``grayscale``, ``rotation`` (random rotation), ``affine``
(random affine), ``hflip``, ``invert`` (random inversion), ``perspective`` (random perspective) and
``elastic``. Each is parametrised by a small frozen dataclass (the ``tcac.params.<name>`` section of the
config), checked by its ``problems()`` method when the config loads.

Randomness never touches torch's global generator. For every (seed, image_id, transform) a
:class:`torch.Generator` is seeded from a stable hash (:func:`seed_for`) and the transform's parameters are
drawn from it with the same distributions as the ``torchvision.transforms.v2`` classes (``RandomRotation``,
``RandomAffine``, ``RandomHorizontalFlip``, ``RandomInvert``, ``RandomPerspective``, ``ElasticTransform``,
``Grayscale``); :func:`sample_params` returns them as JSON-able data. They are applied by the batched tensor
kernels of :mod:`clipaudit.transform_kernels` (``torchvision.transforms.v2.functional`` ops and per-row sampling
grids, on the device the pixels are on); :func:`apply_params` is that same kernel on one image. The drawn
parameters alone determine the output (the elastic displacement field is drawn from a recorded ``field_seed``),
so a re-run gives the same pixels.

TCAC draws and applies them at the CLIP model's input resolution: on the image resized as the model's
preprocessing resizes it, before its centre crop (see :mod:`clipaudit.model_view`). Pixel-valued parameters
(``translate``, the perspective corners, the elastic ``alpha`` and ``sigma``) are therefore pixels of that image.

Nothing here imports torch at module import (the config imports this module).
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

TransformName = Literal["grayscale", "rotation", "affine", "hflip", "invert", "perspective", "elastic"]
"""A transform that TCAC can apply."""
TRANSFORM_NAMES: tuple[str, ...] = typing.get_args(TransformName)
"""Every transform, in the paper's order."""
Interpolation = Literal["nearest", "bilinear"]

Problems = list[tuple[str, str]]
"""(field name, what is wrong) pairs."""


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_range(problems: Problems, name: str, value: float, low: float, high: float, *,
                 low_open: bool = False) -> None:
    """Append a problem when ``value`` is not in [low, high] (or (low, high] when ``low_open``)."""
    ok = _finite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        problems.append((name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}"))


def _check_fill(problems: Problems, fill: int) -> None:
    if not 0 <= fill <= 255:
        problems.append(("fill", f"must be a pixel value in [0, 255], got {fill!r}"))


@dataclass(frozen=True)
class GrayscaleParams:
    """``v2.Grayscale(num_output_channels=3)``: luminance in all three channels; nothing random."""

    def problems(self) -> Problems:
        """Out-of-range fields: none here."""
        return []


@dataclass(frozen=True)
class RotationParams:
    """``v2.RandomRotation``: an angle drawn uniformly from [-degrees, degrees]."""

    degrees: float = 30.0
    """Largest rotation either way, in degrees, in (0, 180]."""
    interpolation: Interpolation = "bilinear"
    expand: bool = False
    """Grow the canvas to hold the whole rotated image (the corners are then filled)."""
    fill: int = 0
    """Pixel value for the area outside the rotated image, 0-255."""

    def problems(self) -> Problems:
        """Out-of-range fields as (field, message)."""
        problems: Problems = []
        _check_range(problems, "degrees", self.degrees, 0.0, 180.0, low_open=True)
        _check_fill(problems, self.fill)
        return problems


@dataclass(frozen=True)
class AffineParams:
    """``v2.RandomAffine``: rotation, translation, scale and an x shear, each drawn uniformly."""

    degrees: float = 15.0
    """Rotation drawn from [-degrees, degrees], in [0, 180]."""
    translate: list[float] = field(default_factory=lambda: [0.1, 0.1])
    """Largest shift as a fraction of width and height, two values in [0, 1]."""
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    """Scale drawn from [low, high], 0 < low <= high <= 10."""
    shear: float = 10.0
    """x shear drawn from [-shear, shear] degrees, in [0, 89]."""
    interpolation: Interpolation = "bilinear"
    fill: int = 0

    def problems(self) -> Problems:
        """Out-of-range fields as (field, message)."""
        problems: Problems = []
        _check_range(problems, "degrees", self.degrees, 0.0, 180.0)
        if len(self.translate) != 2 or not all(_finite(t) and 0.0 <= t <= 1.0 for t in self.translate):
            problems.append(("translate", f"must be two fractions in [0, 1], got {self.translate!r}"))
        if (len(self.scale) != 2 or not all(_finite(s) for s in self.scale)
                or not 0.0 < self.scale[0] <= self.scale[1] <= 10.0):
            problems.append(("scale", f"must be [low, high] with 0 < low <= high <= 10, got {self.scale!r}"))
        _check_range(problems, "shear", self.shear, 0.0, 89.0)
        _check_fill(problems, self.fill)
        return problems


@dataclass(frozen=True)
class ProbabilityParams:
    """A transform with no parameter but its probability ``p``: ``v2.RandomHorizontalFlip`` (mirror left-right),
    ``v2.RandomInvert`` (``255 - pixel``)."""

    p: float = 1.0

    def problems(self) -> Problems:
        """Out-of-range fields as (field, message)."""
        problems: Problems = []
        _check_range(problems, "p", self.p, 0.0, 1.0)
        return problems


HflipParams = ProbabilityParams
InvertParams = ProbabilityParams


@dataclass(frozen=True)
class PerspectiveParams:
    """``v2.RandomPerspective``: each corner moved inwards by up to ``distortion_scale`` of the half size."""

    distortion_scale: float = 0.5
    """In [0, 1]."""
    p: float = 1.0
    interpolation: Interpolation = "bilinear"
    fill: int = 0

    def problems(self) -> Problems:
        """Out-of-range fields as (field, message)."""
        problems: Problems = []
        _check_range(problems, "distortion_scale", self.distortion_scale, 0.0, 1.0)
        _check_range(problems, "p", self.p, 0.0, 1.0)
        _check_fill(problems, self.fill)
        return problems


@dataclass(frozen=True)
class ElasticParams:
    """``v2.ElasticTransform``: a random displacement field, smoothed by a Gaussian of ``sigma`` pixels."""

    alpha: float = 50.0
    """Displacement magnitude, in [0, 1000]."""
    sigma: float = 5.0
    """Smoothness of the field, in (0, 100]."""
    interpolation: Interpolation = "bilinear"
    fill: int = 0

    def problems(self) -> Problems:
        """Out-of-range fields as (field, message)."""
        problems: Problems = []
        _check_range(problems, "alpha", self.alpha, 0.0, 1000.0)
        _check_range(problems, "sigma", self.sigma, 0.0, 100.0, low_open=True)
        _check_fill(problems, self.fill)
        return problems


@dataclass(frozen=True)
class TransformParams:
    """The parameters of every transform (``tcac.params``), one section per transform name."""

    grayscale: GrayscaleParams = field(default_factory=GrayscaleParams)
    rotation: RotationParams = field(default_factory=RotationParams)
    affine: AffineParams = field(default_factory=AffineParams)
    hflip: HflipParams = field(default_factory=HflipParams)
    invert: InvertParams = field(default_factory=InvertParams)
    perspective: PerspectiveParams = field(default_factory=PerspectiveParams)
    elastic: ElasticParams = field(default_factory=ElasticParams)

    def of(self, name: str) -> Any:
        """The parameters of transform ``name``; KeyError for an unknown name."""
        if name not in TRANSFORM_NAMES:
            raise KeyError(f"unknown transform {name!r} (known: {', '.join(TRANSFORM_NAMES)})")
        return getattr(self, name)

    def problems(self) -> Problems:
        """Every out-of-range parameter as (``transform.field``, message)."""
        return [(f"{name}.{key}", message) for name in TRANSFORM_NAMES for key, message in self.of(name).problems()]

    def values(self, name: str) -> dict[str, Any]:
        """The configured parameters of ``name`` as plain data."""
        params = self.of(name)
        return {f.name: getattr(params, f.name) for f in fields(params)}


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
    JSON-able data and, with ``params``, fully determines :func:`apply_params`.
    """
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


def apply_params(image: torch.Tensor, name: str, drawn: dict[str, Any], params: TransformParams) -> torch.Tensor:
    """Apply transform ``name`` with the parameters ``drawn`` by :func:`sample_params` to one uint8 ``(3, H, W)``
    tensor: :func:`clipaudit.transform_kernels.transform_batch` on a stack of one, on the tensor's device (the
    function the TCAC model actor applies to its batches)."""
    from clipaudit.transform_kernels import transform_batch

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


def params_json(drawn: dict[str, Any]) -> str:
    """The drawn parameters as canonical JSON (the ``params`` column)."""
    return json.dumps(drawn, sort_keys=True)
