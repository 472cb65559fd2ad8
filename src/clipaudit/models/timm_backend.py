"""``timm:NAME`` models: any timm image model as the reference model (image only: refused in the CLIP role).

Specs:

- ``timm:NAME`` or ``timm:NAME.TAG`` (``timm:vit_small_patch14_dinov2.lvd142m``, ``timm:convnext_tiny.fb_in22k``):
  a model of timm's registry with its pretrained weights (the architecture's default tag when none is named).
  timm fetches them from the Hugging Face hub (its pretrained config's ``hf_hub_id``, ``model.safetensors`` before
  ``pytorch_model.bin``) or, for a few old models, from a URL into torch's hub folder; they are looked up exactly
  there, in the hub cache (``models.cache_dir``, else ``HF_HUB_CACHE``) without network.
- ``timm:hf-hub:ORG/NAME`` (optionally ``@REVISION``): a timm model published on the hub (``config.json`` names
  the architecture and its preprocessing; weights beside it), as timm's ``create_model("hf-hub:ORG/NAME")``.
- ``timm:NAME//path/to/weights.safetensors`` (or a relative path, ``timm:NAME/ckpt/w.pth``): the architecture
  with a local weights file, loaded by timm's own checkpoint loader (``pretrained_cfg_overlay=dict(file=...)``);
  the preprocessing is that of ``NAME`` (its tag's, when one is named).
- ``timm:NAME/random`` (``NAME`` may carry a tag): the architecture with seeded random weights: the same compute as
  the real model, for benchmarks; the findings are meaningless.

Resolution (on the driver) builds the architecture on torch's ``meta`` device (no memory, no weights, well under
a second), so that the preprocessing is read from the model exactly as timm reads it
(``timm.data.resolve_data_config({}, model=model)``) and one forward pass on meta tensors gives the embedding
dimension (and refuses models whose output is not one pooled vector per image). Weights that are neither cached
nor downloadable (one bounded probe, :mod:`.hub`) raise :class:`ModelUnavailableError`, so
``models.fallback: tiny`` applies.

Embedding: ``timm.create_model(name, pretrained=True, num_classes=0)``: the classifier is dropped and the model
returns its pooled pre-logits features (``forward_head(forward_features(x), pre_logits=True)``), L2-normalised.

Preprocessing: timm's eval transform (``create_transform(**data_config, is_training=False)``), reproduced bit for
bit by a :class:`Preprocess`: crop mode ``center`` (resize the shorter side to ``floor(size / crop_pct)``, center
crop) and ``squash`` at ``crop_pct`` 1 are the ``"torchvision"`` style (timm runs those very torchvision
transforms on the PIL image); ``squash`` below 1 and ``border`` (resize the longer side, pad with the mean colour)
are the ``"timm"`` style. Non-square inputs and interpolations other than bicubic and bilinear are refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from . import hub, tiny
from .base import (
    encode_pixels,
    module_dtype,
    prepare_module,
)
from .errors import ModelSpecError, ModelUnavailableError
from .preprocess import INTERPOLATIONS, Preprocess

if TYPE_CHECKING:
    from .resolved import ResolvedModel

logger = logging.getLogger(__name__)

PREFIX = "timm:"
HF_HUB = "hf-hub:"
RANDOM_TAG = "random"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar", ".npz")
FORMS = ("'timm:NAME' or 'timm:NAME.TAG' (e.g. timm:vit_small_patch14_dinov2.lvd142m), 'timm:hf-hub:ORG/NAME', "
         "'timm:NAME//path/to/weights.safetensors', 'timm:NAME/random'")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TimmTarget:
    """What a ``timm:`` spec resolved to: exactly one weights source (registry tag, hub repo, file, or random).

    Attributes:
        name: the timm model name with its tag, as given (``vit_small_patch14_dinov2.lvd142m``); empty for a hub
            repo.
        architecture: the timm architecture (``vit_small_patch14_dinov2``; from ``config.json`` for a hub repo).
        hub_id: ``ORG/NAME[@REVISION]`` of a ``timm:hf-hub:`` spec.
        checkpoint: the absolute path of a local weights file.
        random: seeded random weights.
    """

    name: str
    architecture: str
    hub_id: str = ""
    checkpoint: str = ""
    random: bool = False

    def load(self, resolved: ResolvedModel, device: str) -> TimmModel:
        """Build the model on ``device`` (see :func:`load`)."""
        return load(resolved, self, device)

    def describe(self, resolved: ResolvedModel) -> dict[str, Any]:
        """Where the weights come from, for :func:`~clipaudit.models.provenance.provenance`."""
        out: dict[str, Any] = {"backend": "timm", "architecture": self.architecture}
        if self.random:
            return {**out, "source": "random (seeded)"}
        if self.checkpoint:
            return {**out, "source": self.checkpoint, "files": [self.checkpoint]}
        found = find_weights(resolved.spec, self, resolved.cache_dir)
        return {**out, "source": found.source, "files": [found.path] if found.path else []}


@dataclass(frozen=True)
class Weights:
    """Where a target's weights are: ``path`` (None: not here, but timm can download them from ``source``),
    ``source`` (a hub repo id, a URL, a path) and ``custom_load`` (timm's ``pretrained_cfg['custom_load']``, as
    timm applies it for that source: the file is handed to the model's own ``load_pretrained``)."""

    path: str | None
    source: str
    custom_load: bool = False
    snapshot: str | None = None
    """A hub repo's snapshot folder (its ``config.json``), for ``timm:hf-hub:`` targets."""


def parse(spec: str, body: str) -> TimmTarget:
    """A ``timm:`` body -> an unchecked target (architecture not yet known for hub repos); ModelSpecError when it
    fits no form, ModelUnavailableError for a weights file that does not exist."""
    if body.startswith(HF_HUB):
        hub_id = body[len(HF_HUB):]
        if not _HUB_ID.match(hub_id):
            raise ModelSpecError(f"bad model spec {spec!r}: expected 'timm:hf-hub:ORG/NAME' (optionally '@REVISION'), "
                                 f"got {hub_id!r}")
        return TimmTarget("", "", hub_id=hub_id)
    name, sep, tail = body.partition("/")
    if not name or ":" in name or (sep and not tail):
        raise ModelSpecError(f"bad model spec {spec!r}: expected one of {FORMS}")
    if not sep:
        return TimmTarget(name, "")
    if tail == RANDOM_TAG:
        return TimmTarget(name, "", random=True)
    path = Path(tail).expanduser()
    if path.is_file():
        return TimmTarget(name, "", checkpoint=str(path.resolve()))
    if "/" in tail or os.sep in tail or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelUnavailableError(spec, f"the weights file {str(path.resolve())!r} does not exist",
                                    hint="name an existing file: 'timm:NAME//absolute/path.safetensors'")
    raise ModelSpecError(f"bad model spec {spec!r}: {tail!r} is neither 'random' nor an existing weights file "
                         f"(expected one of {FORMS})")


def check_name(spec: str, name: str, *, need_weights: bool) -> str:
    """The architecture of a timm model name (``NAME`` or ``NAME.TAG``); ModelSpecError for an unknown
    architecture or tag, or (``need_weights``) a model timm knows no pretrained weights for."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:8] or timm.list_models()[:8]
        raise ModelSpecError(f"bad model spec {spec!r}: timm has no architecture {arch!r} "
                             f"(e.g. {', '.join(close)}; all: timm.list_models())")
    try:
        known = get_pretrained_cfg(name) is not None
    except RuntimeError:
        known = False
    if (tag or need_weights) and not known:
        tags = timm.list_pretrained(f"{arch}.*")
        what = f"no pretrained tag {tag!r}" if tag else "no pretrained weights"
        raise ModelSpecError(f"bad model spec {spec!r}: timm has {what} for {arch} (known: "
                             f"{', '.join(tags) or 'none'}); name a local weights file "
                             f"('timm:{arch}//path/to/weights.safetensors') or use 'timm:{name}/random'")
    return arch


def _split_revision(hub_id: str) -> tuple[str, str | None]:
    repo_id, _, revision = hub_id.partition("@")
    return repo_id, revision or None


def cached_file(hub_id: str, filename: str, cache_dir: str | None) -> str | None:
    """The local path of ``filename`` of ``ORG/NAME[@REVISION]`` in the hub cache, or None; no network."""
    repo_id, revision = _split_revision(hub_id)
    return hub.cached_hub_file(repo_id, filename, cache_dir, revision)


def hub_weight_names(filename: str | None) -> list[str]:
    """The files timm loads from a hub repo, preferred first: ``hf_hub_filename`` (or ``pytorch_model.bin``)
    after its safetensors alternative, as ``timm.models._hub.load_state_dict_from_hf`` tries them."""
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    filename = filename or HF_WEIGHTS_NAME
    if filename.endswith(".safetensors"):
        return [filename]
    return [*_get_safe_alternatives(filename), filename]


def hub_weights(spec: str, hub_id: str, filename: str | None, cache_dir: str | None) -> str | None:
    """The cached weights file of a hub repo, or None when it is not cached but can be downloaded; else
    ModelUnavailableError (a cache look-up, then at most one bounded probe per candidate file)."""
    repo_id, revision = _split_revision(hub_id)
    return hub.find_hub_file(
        spec, repo_id, hub_weight_names(filename), cache_dir, revision,
        hint=f"on a machine with internet: `hf download {repo_id}` (or run timm.create_model('{spec[len(PREFIX):]}', "
             "pretrained=True) once) and copy its cache here")


def url_weights(spec: str, url: str, cache_dir: str | None) -> str | None:
    """A URL's weights file where timm downloads it (``cache_dir``, else torch's hub ``checkpoints`` folder), or
    None when absent but reachable; else ModelUnavailableError."""
    import torch

    folder = os.path.expanduser(cache_dir) if cache_dir else os.path.join(torch.hub.get_dir(), "checkpoints")
    return hub.find_url_file(spec, url, os.path.join(folder, os.path.basename(urlparse(url).path)))


def registry_weights(spec: str, name: str, cache_dir: str | None) -> Weights:
    """Where the pretrained weights of a registry model are, in timm's order of sources (file, hub, URL)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ModelSpecError(f"bad model spec {spec!r}: timm has no pretrained weights for {name!r}")
    if cfg.file:
        if not os.path.isfile(cfg.file):
            raise ModelUnavailableError(spec, f"the weights file {cfg.file!r} does not exist")
        return Weights(str(cfg.file), str(cfg.file), bool(cfg.custom_load))
    if cfg.hf_hub_id:
        custom = cfg.custom_load == "hf" and bool(cfg.hf_hub_filename)
        return Weights(hub_weights(spec, cfg.hf_hub_id, cfg.hf_hub_filename, cache_dir), cfg.hf_hub_id, custom)
    if cfg.url:
        return Weights(url_weights(spec, cfg.url, cache_dir), cfg.url, bool(cfg.custom_load))
    raise ModelSpecError(f"bad model spec {spec!r}: timm names no source for the weights of {name!r}")


def repo_config(spec: str, hub_id: str, cache_dir: str | None, *, download: bool) -> str | None:
    """The cached ``config.json`` of a hub repo; when absent, downloaded (``download`` and the Hub reachable) or
    None (not ``download``); else ModelUnavailableError."""
    found = cached_file(hub_id, "config.json", cache_dir)
    if found or not download:
        return found
    repo_id, revision = _split_revision(hub_id)
    probe = hub.probe_hub_file(repo_id, "config.json")
    if probe.exists:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=hub.hub_cache_dir(cache_dir),
                                   etag_timeout=hub.probe_timeout())
        except Exception as exc:  # noqa: BLE001 - reported as unavailable below
            probe = hub.Probe(True, False, f"{type(exc).__name__}: {exc}")
    raise ModelUnavailableError(
        spec, f"the Hugging Face repo {hub_id} is not in the cache {hub.hub_cache_dir(cache_dir)} and cannot be "
              f"downloaded ({probe.reason})",
        hint=f"on a machine with internet: `hf download {repo_id}` and copy its cache here")


def find_weights(spec: str, target: TimmTarget, cache_dir: str | None) -> Weights:
    """Where the weights of a (non-random) target are now, on this machine."""
    if target.checkpoint:
        if not os.path.isfile(target.checkpoint):
            raise ModelUnavailableError(spec, f"the weights file {target.checkpoint!r} does not exist here")
        return Weights(target.checkpoint, target.checkpoint)
    if not target.hub_id:
        return registry_weights(spec, target.name, cache_dir)
    config = repo_config(spec, target.hub_id, cache_dir, download=False)
    if config is None:
        return Weights(None, HF_HUB + target.hub_id)
    pretrained_cfg = _read_pretrained_cfg(config)
    filename = pretrained_cfg.get("hf_hub_filename")
    custom = pretrained_cfg.get("custom_load") == "hf" and bool(filename)
    return Weights(hub_weights(spec, target.hub_id, filename, cache_dir), HF_HUB + target.hub_id, custom,
                   str(Path(config).parent))


def _read_pretrained_cfg(config_path: str) -> dict[str, Any]:
    """The pretrained config of a hub repo's ``config.json`` (its ``pretrained_cfg``, or the legacy flat dict)."""
    import json

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return dict(config.get("pretrained_cfg", config))


def _model_name(target: TimmTarget, snapshot: str | None) -> str:
    """The name timm's ``create_model`` takes for a target: the registry name, or the repo's snapshot folder
    (``local-dir:``: its ``config.json`` read as timm reads a hub repo's)."""
    return f"local-dir:{snapshot}" if target.hub_id else target.name


def _meta_model(spec: str, name: str) -> Any:
    """The architecture built on the meta device (no memory, no weights), in eval mode, classifier removed."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:
        raise ModelSpecError(f"bad model spec {spec!r}: timm cannot build {name!r}: {exc}") from exc
    return model.eval()


def embedding_dim(spec: str, model: Any, input_size: tuple[int, ...]) -> int:
    """The width of the model's pooled features: one forward pass on meta tensors (the architecture's
    ``head_hidden_size`` / ``num_features`` where meta tensors cannot run it). ModelSpecError when the output is
    not one vector per image (an encoder without a pooling head)."""
    import torch

    declared = int(getattr(model, "head_hidden_size", None) or model.num_features)
    try:
        with torch.inference_mode():
            out = model(torch.empty(1, *input_size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - some ops cannot run on meta tensors; the declared width stands
        logger.debug("%s: no meta forward pass (%s); using the declared width %d", spec, exc, declared)
        return declared
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSpecError(f"bad model spec {spec!r}: the model gives {shape} per batch of one image, not one "
                             "pooled vector (an encoder without a pooling head cannot be a reference model)")
    return int(out.shape[-1])


def preprocess_from_data_config(spec: str, cfg: dict[str, Any]) -> Preprocess:
    """A Preprocess giving the same float tensor as ``timm.data.create_transform(**cfg, is_training=False)``
    (``cfg`` from ``resolve_data_config``); ModelSpecError for what it cannot reproduce."""
    from timm.data import DEFAULT_CROP_MODE, DEFAULT_CROP_PCT

    channels, height, width = (int(v) for v in cfg["input_size"])
    if channels != 3 or height != width:
        raise ModelSpecError(f"bad model spec {spec!r}: input size {tuple(cfg['input_size'])} is not supported "
                             "(3 channels, square images only)")
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ModelSpecError(f"bad model spec {spec!r}: interpolation {interpolation!r} is not supported "
                             f"({' or '.join(INTERPOLATIONS)} only)")
    if cfg.get("crop_border_pixels"):
        raise ModelSpecError(f"bad model spec {spec!r}: crop_border_pixels is not supported")
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    resize = math.floor(height / (cfg.get("crop_pct") or DEFAULT_CROP_PCT))
    mode = cfg.get("crop_mode") or DEFAULT_CROP_MODE
    if mode == "squash" and resize == height:
        return Preprocess(height, height, mean, std, interpolation, resize_mode="squash")
    if mode == "squash":
        return Preprocess(height, resize, mean, std, interpolation, resize_mode="squash", style="timm")
    if mode == "border":
        return Preprocess(height, resize, mean, std, interpolation, resize_mode="longest", style="timm")
    return Preprocess(height, resize, mean, std, interpolation)


def resolve(spec: str, body: str, role: str, cache_dir: str | None) -> tuple[TimmTarget, Preprocess, int]:
    """Check a ``timm:`` spec and that its weights can be had; (target, preprocess, dim). Fast: no weights are
    read or downloaded (a hub repo's ``config.json`` may be, when not cached and the Hub is reachable)."""
    if role == "clip":
        raise ModelSpecError(f"bad model spec {spec!r} for the clip role: timm models have no text tower "
                             "(use a timm: spec for the reference model)")
    target = parse(spec, body)
    if not target.hub_id:
        check_name(spec, target.name, need_weights=not (target.random or target.checkpoint))
    snapshot = None
    if target.hub_id:
        snapshot = str(Path(repo_config(spec, target.hub_id, cache_dir, download=True) or "").parent)
    if not target.random:
        weights = find_weights(spec, target, cache_dir)
        logger.debug("%s: weights %s (from %s)", spec, weights.path or "to be downloaded", weights.source)
    model = _meta_model(spec, _model_name(target, snapshot))
    architecture = str(model.pretrained_cfg.get("architecture") or type(model).__name__)
    target = TimmTarget(target.name, architecture, hub_id=target.hub_id, checkpoint=target.checkpoint,
                        random=target.random)
    from timm.data import resolve_data_config

    data_config = resolve_data_config({}, model=model)
    preprocess = preprocess_from_data_config(spec, data_config)
    dim = embedding_dim(spec, model, tuple(data_config["input_size"]))
    return target, preprocess, dim


def build(resolved: ResolvedModel, target: TimmTarget) -> Any:
    """The timm model of a target on the CPU in fp32, classifier removed (``num_classes=0``): the architecture's
    initialisation seeded (:func:`tiny.seeded`), then the weights, loaded by timm from the file found in the
    cache (or downloaded by timm, when not cached and the Hub is reachable)."""
    import timm

    if target.random:
        with tiny.seeded():
            return timm.create_model(target.name, pretrained=False, num_classes=0)
    weights = find_weights(resolved.spec, target, resolved.cache_dir)
    if weights.path:
        overlay: dict[str, Any] = {"file": weights.path, "custom_load": weights.custom_load}
        if target.hub_id:
            overlay["source"] = ""
        with tiny.seeded():
            return timm.create_model(_model_name(target, weights.snapshot), pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay=overlay)
    name = HF_HUB + target.hub_id if target.hub_id else target.name
    try:
        with tiny.seeded():
            return timm.create_model(name, pretrained=True, num_classes=0,
                                     cache_dir=hub.hub_cache_dir(resolved.cache_dir))
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(resolved.spec, f"timm could not fetch the weights from {weights.source}: "
                                                   f"{exc}") from exc


def load(resolved: ResolvedModel, target: TimmTarget, device: str) -> TimmModel:
    """Build the model of a ``timm:`` target on ``device``."""
    return TimmModel(resolved.spec, build(resolved, target), device, resolved.preprocess, resolved.dim)


class TimmModel:
    """A loaded timm model (image only): its pooled pre-logits features, L2-normalised float32.

    On CUDA the weights are fp16 and batches travel through pinned memory; on the CPU everything is fp32.
    """

    logit_scale: float = float("nan")

    def __init__(self, spec: str, model: Any, device: str, preprocess: Preprocess, dim: int | None = None) -> None:
        self.spec = spec
        self.device = str(device)
        self.dim = int(dim or getattr(model, "head_hidden_size", None) or model.num_features)
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._shape = preprocess.output_shape

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows (``model(x)`` with ``num_classes=0``: pooled
        pre-logits features)."""
        return encode_pixels(pixels, self._shape, self.spec, self.dim, self.device, self._dtype, self._model)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """timm models have no text tower: always TypeError."""
        raise TypeError(f"{self.spec} is an image-only model: it cannot encode texts")
