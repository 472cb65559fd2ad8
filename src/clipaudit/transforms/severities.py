"""Graded corruptions: five common degradations, each at five severity levels, as ImageNet-C grades them.

A graded transform is named ``CORRUPTION@LEVEL`` (``gaussian_blur@3``); ``tcac.transforms`` may list a corruption
alone (``gaussian_blur``), which stands for every level of ``tcac.severities``. Levels run from 1 (mild) to 5
(severe) and take the values of ImageNet-C (Hendrycks and Dietterich, ICLR 2019) where it defines them:

- ``jpeg``: JPEG compression at quality 25, 18, 15, 10, 7 (torchvision's libjpeg / nvjpeg codec).
- ``downscale``: shrink to 0.6, 0.5, 0.4, 0.3, 0.25 of each side (bilinear, antialiased), then back to full size
  (bilinear): ImageNet-C's pixelate, with smooth resampling instead of boxes.
- ``gaussian_blur``: sigma 1, 2, 3, 4, 6 pixels at 224 pixels a side, scaled with the image's short side.
- ``gaussian_noise``: zero-mean noise of standard deviation 0.08, 0.12, 0.18, 0.26, 0.38 (pixels in [0, 1]),
  drawn on the CPU from a recorded ``noise_seed`` so every device adds the same numbers.
- ``brightness``: 0.1, 0.2, 0.3, 0.4, 0.5 added to the HSV value, hue and saturation kept (clipped at 1).

Each corruption runs on a whole uint8 ``(N, 3, H, W)`` stack on its device and is total: it gives an image of the
input's size for any image of at least 1 x 1 pixel. The drawn parameters (``level``, ``value``, and the noise
seed) are recorded in ``tcac_cases.params``, so the report and ``clipaudit score`` re-create the same pixels.
Nothing here imports torch at module import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SEPARATOR = "@"
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "jpeg": (25, 18, 15, 10, 7),
    "downscale": (0.6, 0.5, 0.4, 0.3, 0.25),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}
"""Each corruption's value at levels 1 to 5 (see the module docstring for the units)."""
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)
_BLUR_REFERENCE_SIDE = 224


def graded_name(corruption: str, level: int) -> str:
    """``corruption@level``, checked (ValueError for an unknown corruption or level)."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r} (known: {', '.join(CORRUPTION_NAMES)})")
    if level not in LEVELS:
        raise ValueError(f"{corruption}: severity level must be one of {', '.join(map(str, LEVELS))}, got {level!r}")
    return f"{corruption}{SEPARATOR}{level}"


def parse_graded(name: str) -> tuple[str, int] | None:
    """(corruption, level) of a graded name; None for any other name; ValueError for ``x@y`` that is not one."""
    if SEPARATOR not in name:
        return None
    corruption, _, level = name.partition(SEPARATOR)
    if not level.isdigit():
        raise ValueError(f"{name!r}: a graded transform is CORRUPTION@LEVEL with LEVEL in "
                         f"{', '.join(map(str, LEVELS))}")
    graded_name(corruption, int(level))
    return corruption, int(level)


def is_graded(name: str) -> bool:
    """Whether ``name`` is a well-formed ``corruption@level``."""
    try:
        return parse_graded(name) is not None
    except ValueError:
        return False


def expand(names: Iterable[str], levels: Sequence[int]) -> list[str]:
    """``names`` with each bare corruption replaced by its graded names at ``levels`` (in order, once each)."""
    out: list[str] = []
    for name in names:
        graded = [graded_name(name, level) for level in levels] if name in CORRUPTIONS else [name]
        out.extend(g for g in graded if g not in out)
    return out


def graded_settings(name: str) -> dict[str, Any]:
    """What a graded transform's rows depend on, for the ``settings`` column: the corruption, its level and its
    values at every level (KeyError for a name that is not graded)."""
    parsed = parse_graded(name)
    if parsed is None:
        raise KeyError(name)
    return {"corruption": parsed[0], "level": parsed[1], "values": list(CORRUPTIONS[parsed[0]])}


def blur_sigma(value: float, height: int, width: int) -> float:
    """The blur's sigma on an image of ``height x width``: ``value`` pixels at 224 a side, scaled with the short
    side."""
    return float(value) * min(height, width) / _BLUR_REFERENCE_SIDE


def sample_corruption(name: str, height: int, width: int, generator: torch.Generator) -> dict[str, Any]:
    """The drawn parameters of graded transform ``name``: its ``level`` and ``value``, the blur's applied
    ``sigma``, the noise's ``noise_seed`` (from ``generator``)."""
    import torch

    parsed = parse_graded(name)
    if parsed is None:
        raise KeyError(name)
    corruption, level = parsed
    value = CORRUPTIONS[corruption][level - 1]
    drawn: dict[str, Any] = {"level": level, "value": value}
    if corruption == "gaussian_blur":
        drawn["sigma"] = blur_sigma(value, height, width)
    if corruption == "gaussian_noise":
        drawn["noise_seed"] = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return drawn


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    import torch

    return pixels.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode the whole stack at ``quality`` (on a GPU stack: nvjpeg, batched). torchvision 0.29 marks
    its image codecs deprecated in favour of TorchCodec, which is not a dependency: the warning is silenced."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        encoded = encode_jpeg(list(images.contiguous().unbind(0)), quality=int(quality))
        return torch.stack(decode_jpeg(encoded, device=images.device))


def _downscale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Shrink by ``factor`` (antialiased), then back to the input's size, in float (torch's uint8 antialiased
    resize asserts on some images a few pixels wide)."""
    from torchvision.transforms.v2 import functional as F

    height, width = images.shape[-2:]
    small = [max(1, round(height * factor)), max(1, round(width * factor))]
    pixels = images.float() / 255.0
    shrunk = F.resize(pixels, small, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return _to_uint8(F.resize(shrunk, [height, width], interpolation=F.InterpolationMode.BILINEAR,
                              antialias=False))


def _blur(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Blur each row with its sigma: one separable pass per distinct sigma (a stack of one size has one)."""
    from clipaudit.transforms.kernels import gaussian_blur

    pixels = images.float() / 255.0
    out = images.clone()
    for sigma in dict.fromkeys(sigmas):
        rows = [i for i, s in enumerate(sigmas) if s == sigma]
        out[rows] = _to_uint8(gaussian_blur(pixels[rows], sigma))
    return out


def noise_field(height: int, width: int, noise_seed: int) -> torch.Tensor:
    """The ``(3, H, W)`` standard normal noise of one image, drawn on the CPU from ``noise_seed``."""
    import torch

    generator = torch.Generator().manual_seed(int(noise_seed))
    return torch.randn(3, height, width, generator=generator)


def _noise(images: torch.Tensor, std: float, seeds: Sequence[int]) -> torch.Tensor:
    import torch

    height, width = images.shape[-2:]
    noise = torch.stack([noise_field(height, width, seed) for seed in seeds]).to(images.device)
    return _to_uint8((images.float() / 255.0 + noise * std).clamp_(0.0, 1.0))


def _brightness(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Add ``amount`` to the HSV value: RGB scaled by ``min(V + amount, 1) / V`` (hue and saturation kept); a
    black pixel (V = 0) becomes the grey ``amount``."""
    import torch

    pixels = images.float() / 255.0
    value = pixels.amax(dim=1, keepdim=True)
    target = (value + amount).clamp_(max=1.0)
    scaled = pixels * (target / value.clamp(min=1e-12))
    return _to_uint8(torch.where(value > 0, scaled, target.expand_as(pixels)))


def corrupt_batch(images: torch.Tensor, name: str, drawn: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """Apply graded transform ``name`` to a uint8 ``(N, 3, H, W)`` stack on its device, row ``i`` with the
    parameters ``drawn[i]`` of :func:`sample_corruption`; the N corrupted ``(3, H, W)`` images."""
    import torch

    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (N, 3, H, W) stack, got {tuple(images.shape)} {images.dtype}")
    if len(drawn) != images.shape[0]:
        raise ValueError(f"{len(drawn)} parameter sets for {images.shape[0]} images")
    parsed = parse_graded(name)
    if parsed is None:
        raise KeyError(name)
    corruption, level = parsed
    value = CORRUPTIONS[corruption][level - 1]
    height, width = images.shape[-2:]
    if not drawn:
        return []
    if corruption == "jpeg":
        out = _jpeg(images, int(value))
    elif corruption == "downscale":
        out = _downscale(images, value)
    elif corruption == "gaussian_blur":
        out = _blur(images, [float(d.get("sigma", blur_sigma(value, height, width))) for d in drawn])
    elif corruption == "gaussian_noise":
        out = _noise(images, value, [int(d["noise_seed"]) for d in drawn])
    else:
        out = _brightness(images, value)
    return list(out.unbind(0))


def level_curve(rows: Iterable[tuple[str, float | None]]) -> dict[str, list[tuple[int, float]]]:
    """Per corruption, its (level, figure) points in level order, from (transform name, figure) pairs; other
    transforms and missing figures are left out (what the report plots)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, figure in rows:
        parsed = parse_graded(name) if is_graded(name) else None
        if parsed is None or figure is None or not math.isfinite(figure):
            continue
        curves.setdefault(parsed[0], []).append((parsed[1], float(figure)))
    order = sorted(curves, key=CORRUPTION_NAMES.index)
    return {name: sorted(curves[name]) for name in order}


def most_severe(names: Iterable[str]) -> set[str]:
    """The graded names of ``names`` at the highest level present for their corruption."""
    top: dict[str, int] = {}
    for name in names:
        if is_graded(name):
            corruption, level = parse_graded(name) or ("", 0)
            top[corruption] = max(top.get(corruption, 0), level)
    return {graded_name(corruption, level) for corruption, level in top.items()}
