"""The parameters of TCAC's seven transforms: one small frozen dataclass per transform (the ``tcac.params.<name>``
section of the config), checked by its ``problems()`` method when the config loads. Plain data: nothing here
imports torch (the config imports this module).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

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
