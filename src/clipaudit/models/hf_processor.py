"""Preprocessing read from a transformers image processor's fields (``preprocessor_config.json``), or a family's
defaults when a checkpoint has none: a :class:`~clipaudit.models.preprocess.Preprocess` that gives the same pixels
as transformers' own processor built from the same fields.

CLIP-like families: resize the shorter side to the model's image size (224), center crop, bicubic, OpenAI
mean/std; ImageNet-like (DINOv2 and the other image encoders): resize the shorter side to 256, center crop 224,
bicubic, ImageNet mean/std (style ``"transformers"``, as ``CLIPImageProcessor``, ``BitImageProcessor``,
``SiglipImageProcessor`` ... compute it); DINOv3's processors, which rescale before they resize:
``"transformers_float"``; ``EfficientNetImageProcessor`` (ALIGN's): ``"efficientnet"``, its rescale offset and
``include_top`` reproduced. Fields that cannot be reproduced are a ModelSpecError, never silently dropped.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ModelSpecError
from .hf_families import FAMILIES
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Preprocess

EFFICIENTNET_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"height": 346, "width": 346}, "resample": 3, "do_center_crop": False,
    "crop_size": {"height": 289, "width": 289}, "do_rescale": True, "rescale_factor": 1 / 255,
    "rescale_offset": False, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "include_top": True}
"""``EfficientNetImageProcessor``'s class defaults (transformers 5), for fields a ``preprocessor_config.json``
leaves out."""
ALIGN_PROCESSOR: dict[str, Any] = {"do_center_crop": True, "rescale_factor": 1 / 127.5, "rescale_offset": True,
                                   "do_normalize": False, "include_top": False, "resample": 2}
"""ALIGN's ``EfficientNetImageProcessor`` fields (those transformers' conversion of kakaobrain/align-base set):
the preprocessing of an ALIGN checkpoint without a ``preprocessor_config.json``."""


def family_defaults(family: str, image_size: int = 224) -> Preprocess:
    """Preprocessing of a family (a ``model_type``) when the model has no ``preprocessor_config.json``."""
    known = FAMILIES.get(family)
    if known is not None and known.processor_defaults == "align":
        return efficientnet_preprocess(ALIGN_PROCESSOR)
    if known is None or known.processor_defaults == "imagenet":
        return Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic", style="transformers")
    return Preprocess(image_size, image_size, OPENAI_MEAN, OPENAI_STD, "bicubic", style="transformers")


def _square(value: Any, what: str) -> int:
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        h, w = value.get("height"), value.get("width")
        if h is None or h != w:
            raise ModelSpecError(f"unsupported {what} {value}: square sizes only")
        return int(h)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelSpecError(f"unsupported {what} {value}: square sizes only")
        return int(value[0])
    return int(value)


def _interpolation(resample: Any) -> str:
    """``bilinear`` or ``bicubic`` from a processor's ``resample`` (PIL's number or name); ModelSpecError else."""
    if resample in (2, "bilinear", "BILINEAR"):
        return "bilinear"
    if resample in (3, "bicubic", "BICUBIC"):
        return "bicubic"
    raise ModelSpecError(f"unsupported preprocessing: resample={resample!r} (only bilinear and bicubic)")


def _triple(value: Any) -> tuple[float, float, float]:
    """A per-channel mean or std from a processor field: three numbers, or one for all three channels."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    if len(values) != 3:
        raise ModelSpecError(f"unsupported preprocessing: {value!r} is not one value per RGB channel")
    return values[0], values[1], values[2]


def efficientnet_preprocess(pc: dict[str, Any]) -> Preprocess:
    """A Preprocess of the ``"efficientnet"`` style from ``EfficientNetImageProcessor`` fields (the class
    defaults for those left out): the same pixels as that processor (resize, center crop, rescale with its
    optional offset, optional normalisation, ``include_top``). A processor that leaves images unresized, or
    unrescaled, or not square, is a ModelSpecError."""
    fields = {**EFFICIENTNET_DEFAULTS, **pc}
    if not fields["do_rescale"] or not fields["do_resize"]:
        raise ModelSpecError(f"unsupported preprocessing: do_rescale={fields['do_rescale']}, "
                             f"do_resize={fields['do_resize']} (an EfficientNetImageProcessor must resize and "
                             "rescale)")
    size = fields["size"]
    resize = _square(size, "size")
    shortest = isinstance(size, dict) and "shortest_edge" in size
    if shortest and not fields["do_center_crop"]:
        raise ModelSpecError(f"unsupported preprocessing: resize to {size} without a center crop (not square)")
    crop = _square(fields["crop_size"], "crop_size") if fields["do_center_crop"] else resize
    return Preprocess(crop, resize, _triple(fields["image_mean"]), _triple(fields["image_std"]),
                      _interpolation(fields["resample"]), resize_mode="shortest" if shortest else "squash",
                      style="efficientnet", rescale_factor=float(fields["rescale_factor"]),
                      rescale_offset=bool(fields["rescale_offset"]), normalize=bool(fields["do_normalize"]),
                      include_top=bool(fields["include_top"]))


def preprocess_from_processor_config(pc: dict[str, Any], family: str, image_size: int = 224) -> Preprocess:
    """A Preprocess from a ``preprocessor_config.json`` (CLIPImageProcessor / BitImageProcessor fields; DINOv3's
    processors, which rescale before they resize, get the ``transformers_float`` style; EfficientNet's, ALIGN's
    included, the ``efficientnet`` style: :func:`efficientnet_preprocess`).

    The result gives the same pixels as transformers' processor built from the same fields; fields it cannot
    reproduce (a rescale other than 1/255 outside EfficientNet's processor, a non-square size) are a
    ModelSpecError.
    """
    if family == "align" or str(pc.get("image_processor_type", "")).startswith("EfficientNet"):
        return efficientnet_preprocess(pc)
    base = family_defaults(family, image_size)
    if not pc.get("do_rescale", True) or not math.isclose(float(pc.get("rescale_factor", 1 / 255)), 1 / 255):
        raise ModelSpecError(f"unsupported preprocessing: do_rescale={pc.get('do_rescale')}, "
                             f"rescale_factor={pc.get('rescale_factor')} (only a rescale by 1/255 is supported)")
    interpolation = _interpolation(pc.get("resample", 3))
    if pc.get("do_normalize", True):
        mean = tuple(pc.get("image_mean", base.mean))
        std = tuple(pc.get("image_std", base.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = pc.get("size", base.resize_size)
    style = "transformers_float" if pc.get("image_processor_type", "").startswith("DINOv3") else "transformers"
    squash = isinstance(size, dict) and "shortest_edge" not in size
    resize = _square(size, "size") if pc.get("do_resize", True) else base.resize_size
    crop = _square(pc.get("crop_size", resize), "crop_size") if pc.get("do_center_crop", True) else resize
    if squash:
        if crop != resize:
            raise ModelSpecError(f"unsupported preprocessing: resize to {size} then crop {crop}")
        return Preprocess(resize, resize, mean, std, interpolation, resize_mode="squash", style=style)
    return Preprocess(crop, resize, mean, std, interpolation, style=style)
