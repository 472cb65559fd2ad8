"""Preprocess: shapes, dtypes, validation, the same pixels as torchvision's transforms, hf processor configs.

Identity with transformers' processors and open_clip's transform on many shapes: test_preprocess_reference.py.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from clipaudit.models import Preprocess
from clipaudit.models.hf_processor import preprocess_from_processor_config
from clipaudit.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
)

os.environ["HF_HUB_OFFLINE"] = "1"


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(120, 90), (90, 120), (64, 64), (30, 20), (301, 77)])
def test_normalize_kind_gives_float32_chw(size):
    pre = Preprocess(64, 73, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    out = pre(_image(*size))
    assert out.shape == (3, 64, 64) == pre.output_shape
    assert out.dtype == np.float32 == pre.output_dtype
    assert out.flags.c_contiguous


def test_rgb_kind_gives_uint8_hwc_center_crop():
    pre = Preprocess(32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic", kind="rgb")
    out = pre(_image(64, 32))
    assert out.shape == (32, 32, 3) == pre.output_shape and out.dtype == np.uint8
    expected = np.asarray(_image(64, 32))[:, 16:48]
    np.testing.assert_array_equal(out, expected)


def test_normalisation_values():
    pre = Preprocess(4, 4, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), "bilinear")
    out = pre(Image.new("RGB", (4, 4), (255, 0, 51)))
    np.testing.assert_allclose(out[:, 0, 0], [2.0, -1.0, -0.3], rtol=1e-6, atol=1e-6)


def test_non_rgb_input_is_converted():
    pre = Preprocess(16, 16, OPENAI_MEAN, OPENAI_STD, "bicubic")
    assert pre(_image(20, 20).convert("L")).shape == (3, 16, 16)


@pytest.mark.parametrize("mode,interp", [("shortest", "bicubic"), ("shortest", "bilinear"),
                                         ("squash", "bicubic"), ("longest", "bicubic")])
@pytest.mark.parametrize("size", [(120, 90), (50, 211), (64, 64), (40, 30)])
def test_matches_open_clip_image_transform(mode, interp, size):
    from open_clip.transform import image_transform

    reference = image_transform(64, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=mode,
                                interpolation=interp)
    image = _image(*size, seed=3)
    expected = reference(image).numpy()
    ours = Preprocess(64, 64, OPENAI_MEAN, OPENAI_STD, interp, resize_mode=mode)(image)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_dinov2_style_resize_then_crop_matches_torchvision():
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for size in [(500, 375), (224, 300), (100, 80)]:
        image = _image(*size, seed=5)
        ours = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic")(image)
        np.testing.assert_allclose(ours, reference(image).numpy(), atol=1e-5)


def test_crop_larger_than_resized_image_pads_like_torchvision():
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(20), T.CenterCrop(33), T.ToTensor()])
    image = _image(30, 20, seed=9)
    ours = Preprocess(33, 20, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")(image)
    np.testing.assert_allclose(ours, reference(image).numpy(), atol=1e-6)


def test_is_picklable_data():
    pre = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    again = pickle.loads(pickle.dumps(pre))
    assert again == pre and hash(again) == hash(pre)


@pytest.mark.parametrize("kwargs", [{"interpolation": "nearest"}, {"kind": "tensor"}, {"image_size": 0},
                                    {"resize_mode": "crop"}, {"std": (1.0, 0.0, 1.0)}, {"style": "pil"},
                                    {"style": "transformers", "resize_mode": "longest"}])
def test_bad_fields_are_errors(kwargs):
    fields = {"image_size": 8, "resize_size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
              "interpolation": "bicubic"}
    fields.update(kwargs)
    with pytest.raises(ValueError):
        Preprocess(**fields)


def test_hf_processor_configs():
    legacy_clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "resample": 3, "size": 224}
    assert preprocess_from_processor_config(legacy_clip, "clip") == Preprocess(224, 224, OPENAI_MEAN, OPENAI_STD,
                                                                               "bicubic", style="transformers")
    dino = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD), "resample": 3, "size": {"shortest_edge": 256}}
    assert preprocess_from_processor_config(dino, "dinov2") == Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD,
                                                                          "bicubic", style="transformers")
    squash = {"size": {"height": 256, "width": 256}, "do_center_crop": False, "resample": 2,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert preprocess_from_processor_config(squash, "clip") == Preprocess(
        256, 256, (0.5,) * 3, (0.5,) * 3, "bilinear", resize_mode="squash", style="transformers")


@pytest.mark.parametrize("fields", [{"do_rescale": False}, {"rescale_factor": 1 / 127.5}])
def test_hf_processor_config_with_another_rescale_is_an_error(fields):
    from clipaudit.models import ModelSpecError

    with pytest.raises(ModelSpecError, match="rescale"):
        preprocess_from_processor_config({"size": {"shortest_edge": 256}, **fields}, "dinov2")


@pytest.mark.parametrize("resample", [0, 1, "nearest"])
def test_hf_processor_config_with_another_resample_is_an_error(resample):
    """A resample the pipeline cannot reproduce (nearest, lanczos) is refused, never replaced by bicubic."""
    from clipaudit.models import ModelSpecError

    with pytest.raises(ModelSpecError, match="resample"):
        preprocess_from_processor_config({"size": {"shortest_edge": 256}, "resample": resample}, "dinov2")
