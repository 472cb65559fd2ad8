"""``open_clip:ARCH/TAG`` models.

- ``TAG`` a pretrained tag of open_clip (``open_clip:ViT-B-32/openai``, ``open_clip:ViT-B-32/laion2b_s34b_b79k``):
  weights from the Hugging Face cache, or downloaded by open_clip when the Hub can be reached.
- ``TAG`` a local checkpoint file (``open_clip:ViT-B-32//abs/path/model.pt``, ``open_clip:ViT-B-32/ckpt/m.pt``,
  ``.pt``/``.pth``/``.bin``/``.safetensors``): loaded with open_clip's checkpoint loader (strict).
- ``TAG`` = ``random``: the architecture with seeded random weights: the same compute as the real model,
  for benchmarks (``open_clip:ViT-B-32/random``). Its findings are meaningless.
- ``open_clip:hf-hub:ORG/NAME``: a model published for open_clip on the Hugging Face hub (EVA, MetaCLIP, DFN,
  SigLIP, PE checkpoints: ``open_clip_config.json`` + ``open_clip_model.safetensors``), from the hub cache (or
  downloaded when the Hub can be reached), its architecture and preprocessing read from that config.

Preprocessing comes from the architecture config (image size) and the tag's pretrained config (mean, std,
interpolation, resize mode) without building the model; a checkpoint file or ``random`` uses open_clip's
defaults (OpenAI mean/std, bicubic, shortest side). Tags trained with QuickGELU (``openai`` among them) are
built with QuickGELU, as their weights need.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import hub, packaged, tiny
from .base import (
    empty_rows,
    encode_pixels,
    module_dtype,
    prepare_module,
    tensor_to_unit_rows,
)
from .errors import ModelSpecError, ModelUnavailableError
from .preprocess import Preprocess

if TYPE_CHECKING:
    from .base import LoadedModel
    from .resolved import ResolvedModel

logger = logging.getLogger(__name__)

RANDOM_TAG = "random"
HF_HUB = "hf-hub:"
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


@dataclass(frozen=True)
class OpenClipTarget:
    """What an ``open_clip:`` spec resolved to: the weights are one of tag, checkpoint, or none (random)."""

    arch: str
    tag: str | None = None
    checkpoint: str | None = None
    random: bool = False
    packaged: str | None = None
    """``probe-clip``: the architecture's seeded initialisation, then this weights file (:mod:`.packaged`)."""
    hub_weights: str = ""
    """``hf-hub:`` models (``arch`` is ``hf-hub:ORG/NAME``): the cached weights file ("" until downloaded)."""

    def load(self, resolved: ResolvedModel, device: str) -> LoadedModel:
        """Build the model on ``device`` (see :func:`load`)."""
        return load(resolved, self, device)

    def describe(self, resolved: ResolvedModel) -> dict[str, Any]:
        """Where the weights come from, for :func:`~clipaudit.models.provenance.provenance`."""
        out: dict[str, Any] = {"backend": "open_clip", "architecture": self.arch}
        if self.packaged:
            return {**out, "source": self.packaged, "files": [self.packaged]}
        if self.checkpoint:
            return {**out, "source": self.checkpoint, "files": [self.checkpoint]}
        if self.arch.startswith(HF_HUB):
            return {**out, "source": self.arch[len(HF_HUB):], "files": [self.hub_weights] if self.hub_weights else []}
        if self.random or not self.tag:
            return {**out, "source": "random (seeded)"}
        found = check_weights(resolved.spec, pretrained_config(self.arch, self.tag), resolved.cache_dir)
        return {**out, "source": f"{self.arch}/{self.tag}", "files": [found] if found else []}


def parse(spec: str, body: str) -> tuple[str, str]:
    """``ARCH/TAG`` -> (arch, tag); ModelSpecError when either is missing."""
    arch, sep, tag = body.partition("/")
    if not arch or not sep or not tag:
        raise ModelSpecError(
            f"bad model spec {spec!r}: expected 'open_clip:ARCH/TAG', e.g. 'open_clip:ViT-B-32/openai', "
            "'open_clip:ViT-B-32//path/to/checkpoint.pt' or 'open_clip:ViT-B-32/random'")
    if ":" in arch:
        raise ModelSpecError(f"bad model spec {spec!r}: open_clip schemas (hf-hub:, local-dir:) are not supported "
                             "here; name an architecture and a tag or a checkpoint file")
    return arch, tag


def model_config(spec: str, arch: str) -> dict[str, Any]:
    """open_clip's architecture config (no model is built); ModelSpecError for an unknown architecture."""
    import open_clip

    tiny.register_open_clip_config()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        known = open_clip.list_models()
        close = [m for m in known if arch.lower() in m.lower()][:8] or known[:8]
        raise ModelSpecError(f"bad model spec {spec!r}: open_clip has no architecture {arch!r} "
                             f"(e.g. {', '.join(close)}; all: open_clip.list_models())")
    return cfg


def pretrained_config(arch: str, tag: str) -> dict[str, Any]:
    """open_clip's config of a pretrained tag ({} when the tag is unknown)."""
    import open_clip

    return dict(open_clip.get_pretrained_cfg(arch, tag))


def preprocess_from_configs(model_cfg: dict[str, Any], pretrained_cfg: dict[str, Any]) -> Preprocess:
    """A Preprocess from the architecture's image size and the tag's preprocessing config."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = merge_preprocess_dict(PreprocessCfg(), {**model_cfg.get("preprocess_cfg", {}), **pretrained_cfg})
    size = model_cfg.get("vision_cfg", {}).get("image_size", merged["size"])
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelSpecError(f"non-square image size {size} is not supported")
        size = size[0]
    interpolation = "bilinear" if merged["interpolation"] == "bilinear" else "bicubic"
    return Preprocess(int(size), int(size), tuple(merged["mean"]), tuple(merged["std"]), interpolation,
                      resize_mode=merged["resize_mode"])


def resolve_hub(spec: str, repo_id: str, role: str, cache_dir: str | None
                ) -> tuple[OpenClipTarget, Preprocess, int]:
    """``open_clip:hf-hub:ORG/NAME``: the repo's ``open_clip_config.json`` and weights from the hub cache (a
    bounded probe of the Hub where they are not cached); (target, preprocess, dim)."""
    import json

    if not repo_id or repo_id.count("/") != 1:
        raise ModelSpecError(f"bad model spec {spec!r}: expected 'open_clip:hf-hub:ORG/NAME'")
    config_path = hub.cached_hub_file(repo_id, HUB_CONFIG, cache_dir)
    weights = next((f for f in (hub.cached_hub_file(repo_id, n, cache_dir) for n in HUB_WEIGHTS) if f), None)
    if config_path is None or weights is None:
        probe = hub.probe_hub_file(repo_id, HUB_CONFIG)
        if not probe.exists or config_path is None:
            raise ModelUnavailableError(
                spec, f"the open_clip repo {repo_id} ({HUB_CONFIG} and {' or '.join(HUB_WEIGHTS)}) is not in the "
                      f"cache {hub.hub_cache_dir(cache_dir)} and cannot be downloaded ({probe.reason})",
                hint=f"on a machine with internet: `hf download {repo_id}` and copy its cache here")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    model_cfg = config.get("model_cfg") or {}
    if "embed_dim" not in model_cfg:
        raise ModelSpecError(f"bad model spec {spec!r}: {config_path} has no model_cfg.embed_dim")
    if role == "clip":
        check_tokenizer(spec, model_cfg, cache_dir)
    preprocess = preprocess_from_configs(model_cfg, config.get("preprocess_cfg") or {})
    return OpenClipTarget(HF_HUB + repo_id, hub_weights=weights or ""), preprocess, int(model_cfg["embed_dim"])


def resolve(spec: str, body: str, role: str, cache_dir: str | None) -> tuple[OpenClipTarget, Preprocess, int]:
    """Check an ``open_clip:`` spec and that its weights can be had; (target, preprocess, dim)."""
    if body.startswith(HF_HUB):
        return resolve_hub(spec, body[len(HF_HUB):], role, cache_dir)
    arch, tag = parse(spec, body)
    cfg = model_config(spec, arch)
    dim = int(cfg["embed_dim"])
    if tag == RANDOM_TAG:
        return OpenClipTarget(arch, random=True), preprocess_from_configs(cfg, {}), dim
    pcfg = pretrained_config(arch, tag)
    if pcfg:
        check_weights(spec, pcfg, cache_dir)
        if role == "clip":
            check_tokenizer(spec, cfg, cache_dir)
        return OpenClipTarget(arch, tag=tag), preprocess_from_configs(cfg, pcfg), dim
    path = Path(tag).expanduser()
    if path.is_file():
        return OpenClipTarget(arch, checkpoint=str(path.resolve())), preprocess_from_configs(cfg, {}), dim
    if "/" in tag or os.sep in tag or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelUnavailableError(spec, f"checkpoint file {str(path.resolve())!r} does not exist")
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ModelSpecError(f"bad model spec {spec!r}: {tag!r} is neither a pretrained tag of {arch} "
                         f"(known: {', '.join(tags) or 'none'}; or 'random') nor an existing checkpoint file")


def weight_candidates(pcfg: dict[str, Any]) -> tuple[str, list[str]]:
    """(hub repo id, file names open_clip would fetch, preferred first) of a tag with an ``hf_hub`` entry."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives

    repo_id, filename = os.path.split(pcfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    return repo_id, [*_get_safe_alternatives(filename), filename]


def check_weights(spec: str, pcfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The cached weights file of a tag, or None when it is not cached but can be downloaded.

    Raises ModelUnavailableError when neither: quickly (a cache look-up, then at most one bounded probe).
    """
    if pcfg.get("file"):
        if os.path.isfile(pcfg["file"]):
            return str(pcfg["file"])
        raise ModelUnavailableError(spec, f"the weights file {pcfg['file']!r} does not exist")
    if pcfg.get("hf_hub"):
        repo_id, names = weight_candidates(pcfg)
        return hub.find_hub_file(spec, repo_id, names, cache_dir)
    url = pcfg.get("url", "")
    if not url:
        raise ModelUnavailableError(spec, "open_clip names no source for its weights")
    return hub.find_url_file(spec, url, os.path.join(os.path.expanduser(cache_dir or "~/.cache/clip"),
                                                     os.path.basename(url)))


def check_tokenizer(spec: str, model_cfg: dict[str, Any], cache_dir: str | None) -> None:
    """For architectures whose tokenizer comes from the Hub (``hf_tokenizer_name``): cached or reachable."""
    name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if not name or os.path.isdir(name):
        return
    for filename in ("tokenizer.json", "tokenizer_config.json"):
        if hub.cached_hub_file(name, filename, cache_dir):
            return
    probe = hub.probe_hub_file(name, "tokenizer_config.json")
    if not probe.exists:
        raise ModelUnavailableError(spec, f"its tokenizer (Hugging Face repo {name}) is not cached and cannot be "
                                          f"downloaded ({probe.reason})")


def _model_cfg(spec: str, arch: str, cache_dir: str | None) -> dict[str, Any]:
    """The architecture config of ``arch``: an ``hf-hub:`` repo's ``open_clip_config.json`` (cached), or open_clip's."""
    import json

    if arch.startswith(HF_HUB):
        path = hub.cached_hub_file(arch[len(HF_HUB):], HUB_CONFIG, cache_dir)
        if path is None:
            return {}
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("model_cfg") or {}
    return model_config(spec, arch)


def get_tokenizer(spec: str, arch: str, cache_dir: str | None) -> Any:
    """open_clip's own tokenizer of ``arch``. A tokenizer from the Hub (``hf_tokenizer_name``: SigLIP's) whose cached
    repo has no ``config.json`` (an open_clip repo need not have one) is built with a blank model config: transformers'
    ``AutoTokenizer`` looks that file up first, and offline the lookup of a file the cache never held fails, where
    online it is a 404 it passes over."""
    import open_clip

    name = _model_cfg(spec, arch, cache_dir).get("text_cfg", {}).get("hf_tokenizer_name")
    kwargs: dict[str, Any] = {}
    if name and not os.path.isdir(name) and hub.cached_hub_file(name, "tokenizer_config.json", cache_dir) \
            and not hub.cached_hub_file(name, "config.json", cache_dir):
        from transformers import PreTrainedConfig

        kwargs["config"] = PreTrainedConfig()
    return open_clip.get_tokenizer(arch, cache_dir=cache_dir, **kwargs)


def build(arch: str, pretrained: str | None, *, cache_dir: str | None = None,
          quick_gelu: bool = False) -> Any:
    """An open_clip model on the CPU in fp32: random init under :func:`tiny.seeded`, then the weights if any."""
    import open_clip

    tiny.register_open_clip_config()
    with tiny.seeded(), _random_init_notice_filtered(pretrained is None):
        return open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir,
                                      force_quick_gelu=quick_gelu, device="cpu", precision="fp32")


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" line (the registry has already said, once, on the driver,
    that the model has random weights; every actor would repeat it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _random_init_notice_filtered(active: bool) -> Iterator[None]:
    root = logging.getLogger()
    notice = _RandomInitNotice()
    if active:
        root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def load(resolved: ResolvedModel, target: OpenClipTarget, device: str) -> OpenClipModel:
    """Build the model of an ``open_clip:`` (or ``tiny-clip``) target on ``device``."""
    pretrained: str | None = None
    quick_gelu = False
    if target.checkpoint:
        if not os.path.isfile(target.checkpoint):
            raise ModelUnavailableError(resolved.spec, f"checkpoint file {target.checkpoint!r} does not exist here")
        pretrained = target.checkpoint
    elif target.tag:
        pcfg = pretrained_config(target.arch, target.tag)
        quick_gelu = bool(pcfg.get("quick_gelu", False))
        pretrained = check_weights(resolved.spec, pcfg, resolved.cache_dir) or target.tag
    try:
        model = build(target.arch, pretrained, cache_dir=resolved.cache_dir, quick_gelu=quick_gelu)
    except RuntimeError as exc:
        if "download" in str(exc).lower():
            raise ModelUnavailableError(resolved.spec, str(exc)) from exc
        raise
    if target.packaged:
        packaged.load_state(model, packaged.checked_file(target.packaged))
    tokenizer = get_tokenizer(resolved.spec, target.arch, resolved.cache_dir)
    dim = int(resolved.dim) if resolved.dim else int(model_config(resolved.spec, target.arch)["embed_dim"])
    return OpenClipModel(resolved.spec, model, tokenizer, device, resolved.preprocess, dim)


class OpenClipModel:
    """A loaded open_clip model: image and text towers, outputs L2-normalised float32.

    On CUDA the weights are fp16 and batches travel through pinned memory; on the CPU everything is fp32.
    """

    def __init__(self, spec: str, model: Any, tokenizer: Any, device: str, preprocess: Preprocess,
                 dim: int) -> None:
        import torch

        self.spec = spec
        self.device = str(device)
        with torch.inference_mode():
            self.logit_scale = float(model.logit_scale.detach().float().exp().item())
            bias = getattr(model, "logit_bias", None)
            self.logit_bias = float(bias.detach().float().reshape(-1)[0].item()) if bias is not None else float("nan")
        self.dim = int(dim)
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._tokenizer = tokenizer
        inner = getattr(tokenizer, "tokenizer", None)
        size = getattr(tokenizer, "vocab_size", None) or (len(inner) if inner is not None else None)
        self.vocab_size: int | None = int(size) if size else None
        self._shape = preprocess.output_shape

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows."""
        return encode_pixels(pixels, self._shape, self.spec, self.dim, self.device, self._dtype,
                             self._model.encode_image)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, unit rows (open_clip's tokenizer, truncated to its context length)."""
        import torch

        if len(texts) == 0:
            return empty_rows(self.dim)
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts))
            tokens = tokens.to(self.device, non_blocking=True) if self.device != "cpu" else tokens
            return tensor_to_unit_rows(self._model.encode_text(tokens))
