"""Graded corruptions (clipaudit.transforms.severities): names, config expansion, the pixels of each corruption
against an independent computation, severity that grows with the level, and seeded noise."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from clipaudit.config import load_config
from clipaudit.transforms import (
    CORRUPTION_NAMES,
    TransformParams,
    expand,
    generator_for,
    parse_graded,
    sample_params,
    transform_batch,
    transform_image,
)
from clipaudit.transforms.severities import CORRUPTIONS, blur_sigma, level_curve, most_severe

PARAMS = TransformParams()


def _photo(size: int = 96, seed: int = 0) -> torch.Tensor:
    """A smooth image with edges (gradients plus blocks), as a uint8 (3, H, W) tensor."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    for _ in range(4):
        x0, y0 = rng.integers(0, size - size // 3, 2)
        pixels[y0:y0 + size // 3, x0:x0 + size // 4] = rng.integers(0, 256, 3)
    return torch.from_numpy(pixels.astype(np.uint8)).permute(2, 0, 1).contiguous()


def _apply(image: torch.Tensor, name: str, image_id: str = "x") -> torch.Tensor:
    drawn = sample_params(name, PARAMS, image.shape[-2], image.shape[-1], generator_for(0, image_id, name))
    return transform_batch(image.unsqueeze(0), name, [drawn], PARAMS)[0]


def test_names_parse_and_expand():
    assert parse_graded("gaussian_blur@3") == ("gaussian_blur", 3)
    assert parse_graded("hflip") is None
    with pytest.raises(ValueError, match="severity level"):
        parse_graded("jpeg@6")
    assert expand(["hflip", "jpeg", "jpeg@3", "brightness@1"], [1, 3]) == ["hflip", "jpeg@1", "jpeg@3",
                                                                          "brightness@1"]
    assert most_severe(["jpeg@1", "jpeg@4", "hflip", "brightness@2"]) == {"jpeg@4", "brightness@2"}
    assert level_curve([("jpeg@3", 2.0), ("jpeg@1", 1.0), ("hflip", 5.0), ("blur", None),
                        ("brightness@2", None)]) == {"jpeg": [(1, 1.0), (3, 2.0)]}


def test_config_expands_bare_corruptions_at_the_configured_levels():
    config = load_config(None, ["tcac.transforms=[hflip, gaussian_noise, jpeg@2]", "tcac.severities=[1, 5]"])
    assert config.tcac.transforms == ["hflip", "gaussian_noise@1", "gaussian_noise@5", "jpeg@2"]
    again = load_config(None, [f"tcac.transforms=[{', '.join(config.tcac.transforms)}]"])
    assert again.tcac.transforms == config.tcac.transforms


def test_brightness_adds_to_the_hsv_value_keeping_hue_and_saturation():
    image = _photo(24, seed=4)
    out = _apply(image, "brightness@3")
    amount = CORRUPTIONS["brightness"][2]
    for y, x in [(0, 0), (5, 17), (12, 3), (23, 23)]:
        r, g, b = (image[:, y, x].double() / 255).tolist()
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        expected = np.array(colorsys.hsv_to_rgb(h, s, min(v + amount, 1.0))) * 255
        assert np.abs(out[:, y, x].numpy() - expected).max() <= 1.0, (y, x)


def test_blur_is_torchvisions_gaussian_blur():
    image = _photo(224, seed=1)
    out = _apply(image, "gaussian_blur@2")
    sigma = blur_sigma(CORRUPTIONS["gaussian_blur"][1], 224, 224)
    size = int(8 * sigma + 1) | 1
    theirs = F.gaussian_blur(image, [size, size], [sigma, sigma])
    assert (out.int() - theirs.int()).abs().max() <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jpeg_is_an_encode_decode_at_the_levels_quality():
    image = _photo(64, seed=2)
    out = _apply(image, "jpeg@4")
    from torchvision.io import decode_jpeg, encode_jpeg

    theirs = decode_jpeg(encode_jpeg(image, quality=int(CORRUPTIONS["jpeg"][3])))
    assert torch.equal(out, theirs)


def test_downscale_keeps_the_size_and_loses_detail():
    image = _photo(90, seed=3)
    mild, severe = _apply(image, "downscale@1"), _apply(image, "downscale@5")
    assert mild.shape == severe.shape == image.shape
    edges = [float(np.abs(np.diff(x.float().numpy(), axis=2)).mean()) for x in (image, mild, severe)]
    assert edges[0] > edges[1] > edges[2]


@pytest.mark.parametrize("corruption", CORRUPTION_NAMES)
def test_damage_grows_with_the_level(corruption):
    image = _photo(112, seed=5)
    damage = [float((_apply(image, f"{corruption}@{level}").float() - image.float()).abs().mean())
              for level in range(1, 6)]
    assert all(a <= b + 0.5 for a, b in zip(damage, damage[1:])), damage
    assert damage[-1] > damage[0] and damage[0] > 0


def test_noise_is_seeded_per_image_and_recorded():
    image = _photo(48)
    a, b = _apply(image, "gaussian_noise@3", "one"), _apply(image, "gaussian_noise@3", "one")
    c = _apply(image, "gaussian_noise@3", "two")
    assert torch.equal(a, b) and not torch.equal(a, c)
    drawn = sample_params("gaussian_noise@3", PARAMS, 48, 48, generator_for(0, "one", "gaussian_noise@3"))
    assert drawn["level"] == 3 and drawn["value"] == CORRUPTIONS["gaussian_noise"][2] and "noise_seed" in drawn
    residual = (a.float() - image.float()) / 255
    inside = (image > 40) & (image < 215)
    assert abs(float(residual[inside].std()) - CORRUPTIONS["gaussian_noise"][2]) < 0.02


def test_a_pil_image_goes_through_as_tcac_does():
    picture = Image.fromarray(_photo(40).permute(1, 2, 0).numpy())
    out, drawn = transform_image(picture, "jpeg@5", PARAMS, 0, "x")
    assert out.size == picture.size and drawn == {"level": 5, "value": 7}
