"""Models: a spec string names a model; one registry resolves it and owns its preprocessing.

    resolved = resolve_model("open_clip:ViT-B-32/openai", "clip", fallback="none")   # on the driver
    model = resolved.load("cuda")                                                     # once per actor
    vectors = model.encode_images(np.stack([resolved.preprocess(img) for img in images]))

See :mod:`clipaudit.models.registry` for the spec forms and :mod:`clipaudit.models.plugin` for the
``python:`` plug-in interface. Importing this package does not import torch, open_clip or transformers.
"""

from .base import LoadedModel, l2_normalise
from .errors import ModelSpecError, ModelUnavailableError
from .preprocess import Preprocess
from .registry import parse_spec, resolve_model
from .resolved import ResolvedModel

__all__ = [
    "LoadedModel",
    "ModelSpecError",
    "ModelUnavailableError",
    "Preprocess",
    "ResolvedModel",
    "l2_normalise",
    "parse_spec",
    "resolve_model",
]
