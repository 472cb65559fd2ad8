"""``python:package.module:factory``: any user model behind a small interface.

The plug-in interface
---------------------
``factory`` is a callable found by importing ``package.module`` (it may be a dotted attribute path, e.g.
``python:mypkg.models:MyModel.create``). It is called once per actor, with ``device="cuda"`` / ``"cpu"`` as a
keyword argument when its signature accepts ``device``, else with no arguments, and returns an object with:

- ``encode_images(images: list[PIL.Image.Image]) -> array (n, d)``: the images are RGB PIL images of
  ``image_size x image_size`` pixels (the shorter side resized with bicubic resampling, then center cropped);
- for a model in the CLIP role, also ``encode_texts(texts: list[str]) -> array (n, d)`` and
  ``logit_scale: float`` (the factor applied to cosine similarities before a softmax; about 100 for CLIP);
- optionally ``dim: int`` (else found by encoding one image when loaded).

Arrays may be numpy arrays, torch tensors (any device) or nested lists. Vectors need not be normalised: the
registry L2-normalises them and returns float32.

The input size is decided on the driver before the factory runs, so it is read from the *factory*:
``image_size`` as an attribute of the factory (a class attribute when the factory is a class, or
``factory.image_size = 336`` on a function); default 224. An object whose own ``image_size`` disagrees is an
error. The module must be importable wherever the model is loaded (on a cluster: ship it in the job's
working directory or install it).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import check_pixels, empty_rows, finite_float, l2_normalise
from .errors import ModelSpecError
from .preprocess import Preprocess

if TYPE_CHECKING:
    from .base import LoadedModel
    from .resolved import ResolvedModel

DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class PluginTarget:
    """A ``python:`` spec split: the module to import and the attribute path of the factory in it."""

    module: str
    attr: str

    def load(self, resolved: ResolvedModel, device: str) -> LoadedModel:
        """Call the factory on ``device`` (see :func:`load`)."""
        return load(resolved, self, device)

    def describe(self, resolved: ResolvedModel) -> dict[str, Any]:
        """A plug-in's weights are its own business: only the factory is named."""
        return {"backend": "python", "source": f"{self.module}:{self.attr}"}


def parse(spec: str, body: str) -> PluginTarget:
    """``package.module:factory`` -> PluginTarget; ModelSpecError when malformed."""
    module, sep, attr = body.partition(":")
    names = module.split(".") + attr.split(".")
    if not sep or not module or not attr or not all(n.isidentifier() for n in names):
        raise ModelSpecError(f"bad model spec {spec!r}: expected 'python:package.module:factory' "
                             "(a module path and a factory name)")
    return PluginTarget(module, attr)


def find_factory(spec: str, target: PluginTarget) -> Callable[..., Any]:
    """Import the module and return the factory; ModelSpecError naming what is missing."""
    try:
        obj: Any = importlib.import_module(target.module)
    except ImportError as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {target.module!r} ({exc}); "
                             "it must be importable (installed, or on PYTHONPATH / the job's working dir)") from exc
    for part in target.attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model spec {spec!r}: {target.module} has no attribute {target.attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {target.module}:{target.attr} is not callable")
    return obj


def factory_image_size(spec: str, factory: Any) -> int:
    """The ``image_size`` attribute of the factory (default 224), validated."""
    size = getattr(factory, "image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ModelSpecError(f"model spec {spec!r}: image_size must be a positive int, got {size!r}")
    return size


def resolve(spec: str, body: str) -> tuple[PluginTarget, Preprocess]:
    """Check a ``python:`` spec (imports the module; does not call the factory); (target, preprocess)."""
    target = parse(spec, body)
    size = factory_image_size(spec, find_factory(spec, target))
    return target, Preprocess(size, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic", kind="rgb")


def _accepts_device(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "device" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def load(resolved: ResolvedModel, target: PluginTarget, device: str) -> PluginModel:
    """Call the factory and check the object it returns against the interface."""
    spec = resolved.spec
    factory = find_factory(spec, target)
    obj = factory(device=device) if _accepts_device(factory) else factory()
    missing = [m for m in ("encode_images",) + (("encode_texts",) if resolved.role == "clip" else ())
               if not callable(getattr(obj, m, None))]
    if missing:
        raise ModelSpecError(f"model spec {spec!r}: the object from {target.module}:{target.attr} lacks "
                             f"{', '.join(missing)}() (see clipaudit.models.plugin for the interface)")
    logit_scale = float("nan")
    if resolved.role == "clip":
        try:
            logit_scale = finite_float(obj.logit_scale)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelSpecError(f"model spec {spec!r}: a CLIP-role plug-in needs a finite float "
                                 f"`logit_scale` ({exc})") from exc
    size = getattr(obj, "image_size", resolved.preprocess.image_size)
    if size != resolved.preprocess.image_size:
        raise ModelSpecError(f"model spec {spec!r}: the model's image_size {size!r} differs from the factory's "
                             f"{resolved.preprocess.image_size}; set `image_size` on the factory itself")
    return PluginModel(spec, obj, str(device), resolved.preprocess, logit_scale)


def as_matrix(value: Any, n: int, spec: str, what: str) -> np.ndarray:
    """A plug-in's output as a float32 (n, d) numpy array; ValueError naming the spec otherwise."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    out = np.asarray(value, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] == 0:
        raise ValueError(f"{spec}: {what} must return an (n, d) array for {n} inputs, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{spec}: {what} returned non-finite values")
    return out


class PluginModel:
    """A ``python:`` model behind the LoadedModel interface: PIL images in, unit float32 rows out."""

    def __init__(self, spec: str, obj: Any, device: str, preprocess: Preprocess, logit_scale: float) -> None:
        self.spec = spec
        self.device = device
        self.logit_scale = logit_scale
        self._obj = obj
        self._shape = preprocess.output_shape
        dim = getattr(obj, "dim", None)
        if dim is None:
            s = preprocess.image_size
            dim = self.encode_images(np.full((1, s, s, 3), 127, dtype=np.uint8), check_dim=False).shape[1]
        self.dim = int(dim)

    def encode_images(self, pixels: np.ndarray, *, check_dim: bool = True) -> np.ndarray:
        """(n, S, S, 3) uint8 RGB -> PIL images -> the plug-in -> (n, dim) float32, unit rows."""
        from PIL import Image

        check_pixels(pixels, self._shape, self.spec)
        if len(pixels) == 0:
            return empty_rows(self.dim)
        images = [Image.fromarray(np.ascontiguousarray(p, dtype=np.uint8)) for p in pixels]
        out = as_matrix(self._obj.encode_images(images), len(images), self.spec, "encode_images")
        if check_dim and out.shape[1] != self.dim:
            raise ValueError(f"{self.spec}: encode_images returned dimension {out.shape[1]}, expected {self.dim}")
        return l2_normalise(out)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> the plug-in -> (n, dim) float32, unit rows."""
        encode = getattr(self._obj, "encode_texts", None)
        if not callable(encode):
            raise TypeError(f"{self.spec} has no encode_texts(): it is an image-only plug-in")
        if len(texts) == 0:
            return empty_rows(self.dim)
        out = as_matrix(encode(list(texts)), len(texts), self.spec, "encode_texts")
        if out.shape[1] != self.dim:
            raise ValueError(f"{self.spec}: encode_texts returned dimension {out.shape[1]}, expected {self.dim}")
        return l2_normalise(out)
