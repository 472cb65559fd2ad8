"""TCAC's transforms: seeded per (seed, image_id, transform), equal to torchvision.transforms.v2 under the same
seed, reproducible from the recorded parameters, and validated when the config loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from clipaudit.config import ConfigError, TcacConfig, load_config
from clipaudit.transforms import (
    TRANSFORM_NAMES,
    HflipParams,
    InvertParams,
    PerspectiveParams,
    TransformParams,
    apply_params,
    params_json,
    sample_params,
    seed_for,
    transform_image,
)

PARAMS = TransformParams()
BILINEAR = InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_seeds_are_stable_and_distinct():
    assert seed_for(0, "a.jpg", "rotation") == 2992139204071942678
    assert seed_for(0, "a.jpg", "rotation") == seed_for(0, "a.jpg", "rotation") < 2**63
    others = {seed_for(1, "a.jpg", "rotation"), seed_for(0, "b.jpg", "rotation"), seed_for(0, "a.jpg", "affine")}
    assert seed_for(0, "a.jpg", "rotation") not in others and len(others) == 3


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_same_seed_same_pixels_and_parameters(image, name):
    first, drawn = transform_image(image, name, PARAMS, 5, "x.jpg")
    again, drawn_again = transform_image(image, name, PARAMS, 5, "x.jpg")
    assert drawn == drawn_again and np.array_equal(pixels(first), pixels(again))
    assert first.mode == "RGB" and first.size == image.size
    assert json.loads(params_json(drawn)) == drawn
    replayed = apply_params(F.pil_to_tensor(image), name, json.loads(params_json(drawn)), PARAMS)
    assert np.array_equal(replayed.permute(1, 2, 0).numpy(), pixels(first))
    if name not in ("grayscale", "hflip", "invert"):
        _, other = transform_image(image, name, PARAMS, 5, "y.jpg")
        assert other != drawn


def test_the_deterministic_transforms_do_what_they_say(image):
    source = pixels(image)
    assert np.array_equal(pixels(transform_image(image, "hflip", PARAMS, 0, "i")[0]), source[:, ::-1])
    assert np.array_equal(pixels(transform_image(image, "invert", PARAMS, 0, "i")[0]), 255 - source)
    gray = pixels(transform_image(image, "grayscale", PARAMS, 0, "i")[0])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    never = TransformParams(hflip=HflipParams(p=0.0), invert=InvertParams(p=0.0),
                            perspective=PerspectiveParams(p=0.0))
    for name in ("hflip", "invert", "perspective"):
        out, drawn = transform_image(image, name, never, 0, "i")
        assert drawn == {"applied": False} and np.array_equal(pixels(out), source)


def test_drawn_parameters_stay_in_their_ranges():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        assert abs(sample_params("rotation", PARAMS, 40, 56, generator)["angle"]) <= 30
        affine = sample_params("affine", PARAMS, 40, 56, generator)
        assert abs(affine["angle"]) <= 15 and 0.9 <= affine["scale"] <= 1.1 and abs(affine["shear"][0]) <= 10
        assert abs(affine["translate"][0]) <= round(0.1 * 56) and abs(affine["translate"][1]) <= round(0.1 * 40)
        corners = sample_params("perspective", PARAMS, 40, 56, generator)["endpoints"]
        assert all(0 <= x < 56 and 0 <= y < 40 for x, y in corners)


def _v2_under_seed(transform: v2.Transform, tensor: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transform(tensor)


@pytest.mark.parametrize(("name", "reference"), [
    ("rotation", v2.RandomRotation(30.0, interpolation=BILINEAR, fill=[0.0] * 3)),
    ("affine", v2.RandomAffine(15.0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10.0, interpolation=BILINEAR,
                               fill=[0.0] * 3)),
    ("perspective", v2.RandomPerspective(0.5, p=1.0, interpolation=BILINEAR, fill=[0.0] * 3)),
    ("hflip", v2.RandomHorizontalFlip(p=1.0)),
    ("invert", v2.RandomInvert(p=1.0)),
    ("grayscale", v2.Grayscale(num_output_channels=3)),
])
def test_equal_to_torchvision_v2_under_the_same_seed(image, name, reference):
    tensor = F.pil_to_tensor(image)
    for seed in (0, 1, 2):
        drawn = sample_params(name, PARAMS, tensor.shape[1], tensor.shape[2], torch.Generator().manual_seed(seed))
        assert torch.equal(apply_params(tensor, name, drawn, PARAMS), _v2_under_seed(reference, tensor, seed))


def test_elastic_field_equals_torchvision_v2_for_its_recorded_seed(image):
    """The same noise and filter as ``v2.ElasticTransform``; the blur runs separably (rows, then columns), so a
    rare pixel rounds to the neighbouring grey level."""
    tensor = F.pil_to_tensor(image)
    reference = v2.ElasticTransform(alpha=50.0, sigma=5.0, interpolation=BILINEAR, fill=[0.0] * 3)
    for image_id in ("e.jpg", "f.jpg", "g.jpg"):
        drawn = transform_image(image, "elastic", PARAMS, 0, image_id)[1]
        ours = apply_params(tensor, "elastic", drawn, PARAMS).int()
        theirs = _v2_under_seed(reference, tensor, drawn["field_seed"]).int()
        differ = (ours - theirs).abs()
        assert int(differ.max()) <= 1 and float((differ > 0).float().mean()) < 0.002


@pytest.mark.parametrize(("overrides", "message"), [
    (["tcac.transforms=[hflip, blur]"], r"tcac\.transforms\[1\]: unknown transform 'blur'"),
    (["tcac.transforms=[jpeg@7]"], r"tcac\.transforms\[0\]: jpeg: severity level must be one of 1, 2, 3, 4, 5"),
    (["tcac.transforms=[jpeg@x]"], r"tcac\.transforms\[0\]: 'jpeg@x': a graded transform is CORRUPTION@LEVEL"),
    (["tcac.transforms=[fog@2]"], r"tcac\.transforms\[0\]: unknown corruption 'fog'"),
    (["tcac.severities=[0, 3]"], r"tcac\.severities: must be distinct levels"),
    (["tcac.severities=[]"], r"tcac\.severities: must be distinct levels"),
    (["tcac.transforms=[hflip, hflip]"], "tcac.transforms: 'hflip' is listed more than once"),
    (["tcac.params.rotation.degrees=400"], r"tcac\.params\.rotation\.degrees: must be in \(0, 180\], got 400"),
    (["tcac.params.rotation.degrees=0"], r"tcac\.params\.rotation\.degrees"),
    (["tcac.params.affine.scale=[2, 1]"], r"tcac\.params\.affine\.scale"),
    (["tcac.params.affine.translate=[0.1]"], r"tcac\.params\.affine\.translate"),
    (["tcac.params.hflip.p=1.5"], r"tcac\.params\.hflip\.p: must be in \[0, 1\]"),
    (["tcac.params.elastic.sigma=0"], r"tcac\.params\.elastic\.sigma"),
    (["tcac.params.perspective.fill=300"], r"tcac\.params\.perspective\.fill"),
    (["tcac.params.rotation.interpolation=cubic"], r"tcac\.params\.rotation\.interpolation: 'cubic' is not one"),
    (["tcac.params.blur.sigma=1"], "unknown key tcac.params.blur"),
    (["tcac.params.rotation.angle=3"], "unknown key tcac.params.rotation.angle"),
    (["tcac.pool_neighbours=0"], "tcac.pool_neighbours: must be at least 1"),
])
def test_bad_transform_config_is_an_error_naming_it(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_transform_params_load_from_yaml_and_dump_resolved(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"tcac": {"transforms": ["rotation", "elastic"], "seed": 9,
                                             "params": {"rotation": {"degrees": 45}, "elastic": {"alpha": 20}}}}))
    config = load_config(path, ["tcac.params.affine.shear=5"])
    assert config.tcac.transforms == ["rotation", "elastic"] and config.tcac.seed == 9
    assert config.tcac.params.rotation.degrees == 45.0 and config.tcac.params.elastic.alpha == 20.0
    assert config.tcac.params.affine.shear == 5.0 and config.tcac.params.hflip.p == 1.0
    dumped = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert dumped["tcac"]["params"]["rotation"]["degrees"] == 45.0
    assert TcacConfig().transforms == list(TRANSFORM_NAMES)
