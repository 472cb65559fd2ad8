"""Batched tensor kernels of the paper's TCAC transforms: one call transforms a stack of same-size uint8 images, each
row with its own drawn parameters, on the device the stack is on (the model actor's GPU when it has one).

- ``grayscale``, ``hflip`` and ``invert`` are the ``torchvision.transforms.v2.functional`` ops applied to the
  whole stack (``hflip``/``invert`` only to the rows whose ``applied`` is true).
- ``rotation``, ``affine`` and ``perspective`` build one sampling grid per row with the formulas of the v2 tensor
  kernels (the inverse affine matrix of ``F.affine``/``F.rotate``, the homography of ``F.perspective`` solved in
  float64), then sample the whole stack with one :func:`torch.nn.functional.grid_sample`, filling what falls
  outside with ``fill`` as v2 does (a mask channel, then rounding back to uint8).
- ``elastic`` is ``v2.ElasticTransform`` as a displacement field: per row, uniform noise drawn on the CPU from the
  recorded ``field_seed`` (so every device sees the same numbers), smoothed on the device by v2's Gaussian kernel
  applied separably (rows, then columns: the same filter as v2's 2-D kernel, up to float rounding), scaled by
  ``alpha`` over the width and height, added to the identity grid and sampled with ``grid_sample``.

The kernels are total for any image of at least 1 x 1 pixel: the blur's reflection padding folds back as often
as the kernel needs on images smaller than the kernel. The one failure left is a perspective whose four corners
do not span a plane (possible only on images under 2 pixels a side or with ``distortion_scale`` near 1); it
raises :class:`TransformFailed`, which the caller turns into a reject row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clipaudit.transforms.params import TransformParams


class TransformFailed(ValueError):
    """A transform that cannot be applied to one image (its message says which and why)."""


def inverse_affine_matrix(angle: float, translate: Sequence[float], scale: float,
                          shear: Sequence[float]) -> list[float]:
    """The 2 x 3 inverse affine matrix (row-major) of ``F.affine`` about the image centre: output pixel -> input
    pixel, in pixel units with the centre at the origin."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    tx, ty = float(translate[0]), float(translate[1])
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    matrix = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    matrix[2] -= matrix[0] * tx + matrix[1] * ty
    matrix[5] -= matrix[3] * tx + matrix[4] * ty
    return matrix


def rotation_output_size(matrix: Sequence[float], width: int, height: int) -> tuple[int, int]:
    """(width, height) of the canvas that holds the whole rotated image (``expand=True``), as v2 computes it."""
    import torch

    half_w, half_h = 0.5 * width, 0.5 * height
    corners = torch.tensor([[-half_w, -half_h, 1.0], [-half_w, half_h, 1.0], [half_w, half_h, 1.0],
                            [half_w, -half_h, 1.0]])
    points = corners @ torch.tensor(matrix, dtype=torch.float32).view(2, 3).T
    low, high = points.aminmax(dim=0)
    halfs = torch.tensor((half_w, half_h))
    high = high.add(halfs).mul(1e4).trunc().mul(1e-4).ceil()
    low = low.add(halfs).mul(1e4).trunc().mul(1e-4).floor()
    size = high - low
    return max(1, int(size[0])), max(1, int(size[1]))


def perspective_coefficients(startpoints: Sequence[Sequence[float]],
                             endpoints: Sequence[Sequence[float]]) -> list[float]:
    """The 8 homography coefficients mapping output pixels to input pixels (as ``F.perspective``), solved by
    least squares in float64; :class:`TransformFailed` when the corners do not determine one."""
    import torch

    rows = []
    for (ex, ey), (sx, sy) in zip(endpoints, startpoints, strict=True):
        rows.append([ex, ey, 1.0, 0.0, 0.0, 0.0, -sx * ex, -sx * ey])
        rows.append([0.0, 0.0, 0.0, ex, ey, 1.0, -sy * ex, -sy * ey])
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(startpoints, dtype=torch.float64).view(8)
    if int(torch.linalg.matrix_rank(a)) < 8:
        raise TransformFailed(f"perspective: the corners {list(map(list, endpoints))} do not determine a "
                              "homography (degenerate quadrilateral)")
    solution = torch.linalg.lstsq(a, b, driver="gels").solution.to(torch.float32)
    if not bool(torch.isfinite(solution).all()):
        raise TransformFailed("perspective: the homography is not finite")
    return solution.tolist()


def _base_grid(height: int, width: int, low_x: float, high_x: float, low_y: float, high_y: float,
               device: torch.device) -> torch.Tensor:
    """A ``(1, H, W, 3)`` float32 grid of (x, y, 1) with x and y spaced linearly over the given ranges."""
    import torch

    grid = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    grid[..., 0].copy_(torch.linspace(low_x, high_x, steps=width, device=device))
    grid[..., 1].copy_(torch.linspace(low_y, high_y, steps=height, device=device).unsqueeze_(-1))
    grid[..., 2].fill_(1)
    return grid


def affine_grid(matrices: torch.Tensor, width: int, height: int, out_width: int, out_height: int) -> torch.Tensor:
    """Sampling grids ``(N, oh, ow, 2)`` for ``(N, 2, 3)`` inverse affine matrices (v2's ``_affine_grid``)."""
    import torch

    n = matrices.shape[0]
    base = _base_grid(out_height, out_width, (1.0 - out_width) * 0.5, (out_width - 1.0) * 0.5,
                      (1.0 - out_height) * 0.5, (out_height - 1.0) * 0.5, matrices.device)
    theta = matrices.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=matrices.dtype,
                                                    device=matrices.device)
    grid = base.view(1, out_height * out_width, 3).expand(n, -1, -1).bmm(theta)
    return grid.view(n, out_height, out_width, 2)


def perspective_grid(coefficients: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Sampling grids ``(N, H, W, 2)`` for ``(N, 8)`` homography coefficients (v2's ``_perspective_grid``)."""
    import torch

    n = coefficients.shape[0]
    ones = torch.ones(n, 1, dtype=coefficients.dtype, device=coefficients.device)
    theta1 = coefficients[:, :6].reshape(n, 2, 3)
    denominator = torch.cat([coefficients[:, 6:8], ones], dim=1)
    theta2 = torch.stack([denominator, denominator], dim=1)
    base = _base_grid(height, width, 0.5, width - 0.5, 0.5, height - 0.5, coefficients.device)
    flat = base.view(1, height * width, 3).expand(n, -1, -1)
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=coefficients.dtype, device=coefficients.device)
    numerator = flat.bmm(theta1.transpose(1, 2) / scale)
    grid = numerator.div_(flat.bmm(theta2.transpose(1, 2))).sub_(1.0)
    return grid.view(n, height, width, 2)


def sample_grid(images: torch.Tensor, grid: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """``grid_sample`` a uint8 ``(N, C, H, W)`` stack on float32 ``(N, oh, ow, 2)`` grids; pixels from outside the
    image get ``fill`` (v2's ``_apply_grid_transform``: a mask channel, blended for bilinear); rounded to uint8."""
    import torch
    from torch.nn.functional import grid_sample

    n, channels, height, width = images.shape
    stack = torch.cat([images.to(grid.dtype), torch.ones(n, 1, height, width, dtype=grid.dtype,
                                                          device=images.device)], dim=1)
    sampled = grid_sample(stack, grid, mode=mode, padding_mode="zeros", align_corners=False)
    pixels, mask = torch.tensor_split(sampled, indices=(-1,), dim=-3)
    mask = mask.expand_as(pixels)
    fill_value = torch.full((1, channels, 1, 1), float(fill), dtype=pixels.dtype, device=pixels.device)
    if mode == "nearest":
        pixels = torch.where(mask < 0.5, fill_value.expand_as(pixels), pixels)
    else:
        pixels = pixels.sub_(fill_value).mul_(mask).add_(fill_value)
    return pixels.round_().to(images.dtype)


def gaussian_kernel1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """v2's 1-D Gaussian kernel of ``size`` taps (``F.gaussian_blur``'s 2-D kernel is its outer product)."""
    import torch

    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, dtype=torch.float32, device=device)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)


def reflect_indices(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``size`` axis padded by ``pad`` on both sides by reflection (as ``mode="reflect"``),
    folding back as often as needed when ``pad >= size``."""
    import torch

    positions = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded > size - 1, period - folded, folded)


def gaussian_blur(fields: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a float32 ``(N, C, H, W)`` stack with v2's Gaussian (kernel ``int(8 sigma + 1)`` made odd), separably,
    reflection-padded."""
    from torch.nn.functional import conv2d

    size = int(8 * sigma + 1)
    size += 1 - size % 2
    pad = size // 2
    n, channels, height, width = fields.shape
    kernel = gaussian_kernel1d(size, sigma, fields.device)
    flat = fields.reshape(n * channels, 1, height, width)
    flat = flat.index_select(3, reflect_indices(width, pad, fields.device))
    flat = conv2d(flat, kernel.view(1, 1, 1, size))
    flat = flat.index_select(2, reflect_indices(height, pad, fields.device))
    flat = conv2d(flat, kernel.view(1, 1, size, 1))
    return flat.view(n, channels, height, width)


def elastic_noise(height: int, width: int, field_seed: int) -> torch.Tensor:
    """The ``(2, H, W)`` uniform noise in [-1, 1) behind an elastic field (x then y), drawn on the CPU from
    ``field_seed`` as ``v2.ElasticTransform`` draws it."""
    import torch

    generator = torch.Generator().manual_seed(int(field_seed))
    return torch.cat([torch.rand(1, height, width, generator=generator) * 2 - 1 for _ in range(2)])


def elastic_displacement(noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Displacement fields ``(N, H, W, 2)`` in grid units from ``(N, 2, H, W)`` noise: blurred, times ``alpha``
    over the width (x) and the height (y)."""
    import torch

    height, width = noise.shape[-2:]
    blurred = gaussian_blur(noise, sigma)
    scale = torch.tensor([alpha / width, alpha / height], dtype=blurred.dtype, device=blurred.device)
    return (blurred * scale.view(1, 2, 1, 1)).permute(0, 2, 3, 1)


def identity_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """The ``(1, H, W, 2)`` grid that samples every pixel at its own centre (v2's ``_create_identity_grid``)."""
    import torch

    grid = torch.empty(1, height, width, 2, dtype=torch.float32, device=device)
    grid[..., 0].copy_(torch.linspace((1 - width) / width, (width - 1) / width, width, device=device))
    grid[..., 1].copy_(torch.linspace((1 - height) / height, (height - 1) / height, height,
                                      device=device).unsqueeze_(-1))
    return grid


def _flag_rows(images: torch.Tensor, drawn: Sequence[dict[str, Any]], op: Any) -> torch.Tensor:
    """Apply ``op`` to the rows whose ``applied`` is true; the others are left as they are."""
    import torch

    chosen = [i for i, d in enumerate(drawn) if d.get("applied")]
    if not chosen:
        return images
    if len(chosen) == len(drawn):
        return op(images)
    out = images.clone()
    index = torch.tensor(chosen, device=images.device)
    out[index] = op(images[index])
    return out


def geometric_batch(images: torch.Tensor, name: str, drawn: Sequence[dict[str, Any]],
                    params: TransformParams) -> list[torch.Tensor]:
    """Apply the paper's transform ``name`` to a uint8 ``(N, 3, H, W)`` stack, row ``i`` with the parameters
    ``drawn[i]`` of :func:`clipaudit.transforms.sample_params`, on the stack's device. Returns the N transformed
    ``(3, H', W')`` images (the same size as the input except a rotation with ``expand``)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (N, 3, H, W) stack, got {tuple(images.shape)} {images.dtype}")
    if len(drawn) != images.shape[0]:
        raise ValueError(f"{len(drawn)} parameter sets for {images.shape[0]} images")
    config = params.of(name)
    height, width = images.shape[-2:]
    device = images.device
    if name == "grayscale":
        return list(F.rgb_to_grayscale(images, num_output_channels=3).unbind(0))
    if name == "hflip":
        return list(_flag_rows(images, drawn, F.horizontal_flip).unbind(0))
    if name == "invert":
        return list(_flag_rows(images, drawn, F.invert).unbind(0))
    mode, fill = config.interpolation, float(config.fill)
    if name == "affine":
        matrices = [inverse_affine_matrix(d["angle"], d["translate"], d["scale"], d["shear"]) for d in drawn]
        theta = torch.tensor(matrices, dtype=torch.float32, device=device).view(-1, 2, 3)
        return list(sample_grid(images, affine_grid(theta, width, height, width, height), mode, fill).unbind(0))
    if name == "rotation":
        matrices = [inverse_affine_matrix(-(d["angle"] % 360), [0.0, 0.0], 1.0, [0.0, 0.0]) for d in drawn]
        sizes = [rotation_output_size(m, width, height) if config.expand else (width, height) for m in matrices]
        out: list[torch.Tensor | None] = [None] * len(drawn)
        for size in dict.fromkeys(sizes):
            rows = [i for i, s in enumerate(sizes) if s == size]
            theta = torch.tensor([matrices[i] for i in rows], dtype=torch.float32, device=device).view(-1, 2, 3)
            grid = affine_grid(theta, width, height, size[0], size[1])
            index = torch.tensor(rows, device=device)
            for i, image in zip(rows, sample_grid(images[index], grid, mode, fill).unbind(0)):
                out[i] = image
        return [image for image in out if image is not None]
    if name == "perspective":
        chosen = [i for i, d in enumerate(drawn) if d.get("applied")]
        if not chosen:
            return list(images.unbind(0))
        coefficients = [perspective_coefficients(drawn[i]["startpoints"], drawn[i]["endpoints"]) for i in chosen]
        grid = perspective_grid(torch.tensor(coefficients, dtype=torch.float32, device=device), width, height)
        index = torch.tensor(chosen, device=device)
        out_all = images.clone()
        out_all[index] = sample_grid(images[index], grid, mode, fill)
        return list(out_all.unbind(0))
    if name == "elastic":
        noise = torch.stack([elastic_noise(height, width, d["field_seed"]) for d in drawn]).to(device)
        grid = identity_grid(height, width, device) + elastic_displacement(noise, config.alpha, config.sigma)
        return list(sample_grid(images, grid, mode, fill).unbind(0))
    raise KeyError(name)
