"""``hf:ID_OR_PATH`` and ``hf-random:NAME`` models (transformers): CLIP and DINOv2.

- ``hf:openai/clip-vit-base-patch32``, ``hf:facebook/dinov2-base``, ``hf:/path/to/dir``: the family is read
  from ``config.json`` (``model_type`` ``clip`` or ``dinov2``). An existing directory is a local model (a
  directory written by ``save_pretrained``); anything else of the form ``org/name`` is a Hub id, looked up in the
  Hugging Face cache first (``local_files_only=True``) and downloaded only when the Hub can be reached.
- ``hf-random:dinov2-small`` (also ``dinov2-base``, ``dinov2-large``, ``dinov2-giant``, ``clip-vit-base-patch32``,
  ``clip-vit-base-patch16``, ``clip-vit-large-patch14``): the real architecture built offline from its config
  with seeded random weights: the same compute as the real model, for benchmarks; findings meaningless.

Embeddings:
- CLIP: ``get_image_features`` / ``get_text_features`` (``.pooler_output``: the pooled token through the
  projection), L2-normalised.
- DINOv2: the CLS token of ``last_hidden_state`` after the final layernorm, L2-normalised. (``Dinov2Model``'s
  ``pooler_output`` is exactly that token: ``layernorm(last_hidden_state)[:, 0]``; no extra pooling layer.)

Preprocessing comes from the model's ``preprocessor_config.json`` when present, else the family's defaults:
CLIP: resize the shorter side to the model's image size (224), center crop, bicubic, OpenAI mean/std;
DINOv2: resize the shorter side to 256, center crop 224, bicubic, ImageNet mean/std. Either way the pixels are
those of transformers' own image processor (``CLIPImageProcessor`` / ``BitImageProcessor``, torchvision backend:
what ``AutoImageProcessor`` gives): a ``Preprocess`` of style ``"transformers"``.

Tokenizers (CLIP) load from the model's own files; a tokenizer of fewer than 1000 tokens (what transformers
returns when the files are missing) is an error, never used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import hub, packaged, tiny
from .base import (
    batch_to_device,
    check_pixels,
    empty_rows,
    module_dtype,
    prepare_module,
    tensor_to_unit_rows,
)
from .errors import ModelSpecError, ModelUnavailableError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Preprocess

if TYPE_CHECKING:
    from .base import LoadedModel
    from .resolved import ResolvedModel

logger = logging.getLogger(__name__)

FAMILIES = ("clip", "dinov2")
MIN_VOCAB = 1000
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

RANDOM_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2-small": ("dinov2", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                                "patch_size": 14, "image_size": 518}),
    "dinov2-base": ("dinov2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                               "patch_size": 14, "image_size": 518}),
    "dinov2-large": ("dinov2", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                "patch_size": 14, "image_size": 518}),
    "dinov2-giant": ("dinov2", {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                                "patch_size": 14, "image_size": 518, "use_swiglu_ffn": True}),
    "clip-vit-base-patch32": ("clip", {"projection_dim": 512, "vision_config": {"patch_size": 32}}),
    "clip-vit-base-patch16": ("clip", {"projection_dim": 512, "vision_config": {"patch_size": 16}}),
    "clip-vit-large-patch14": ("clip", {
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14}}),
}
"""``hf-random:`` names -> (family, config of the real checkpoint's architecture, as Dinov2Config / CLIPConfig
keyword arguments)."""


@dataclass(frozen=True)
class HfTarget:
    """What an ``hf:`` / ``hf-random:`` / ``tiny-dino`` spec resolved to.

    ``source`` is a local directory or a Hub id (empty for random models, built from ``config_json``).
    """

    family: str
    source: str
    local: bool
    config_json: str = ""
    packaged: str = ""
    """``probe-dino``: built from ``config_json``, then this weights file (:mod:`.packaged`)."""

    @property
    def random(self) -> bool:
        """True when built from a config with random weights (no ``source`` to load, nothing packaged)."""
        return not self.source and not self.packaged

    def load(self, resolved: ResolvedModel, device: str) -> LoadedModel:
        """Load or build the model on ``device`` (see :func:`load`)."""
        return load(resolved, self, device)

    def describe(self, resolved: ResolvedModel) -> dict[str, Any]:
        """Where the weights come from, for :func:`~clipaudit.models.provenance.provenance`."""
        out: dict[str, Any] = {"backend": "transformers", "architecture": self.family}
        if self.packaged:
            return {**out, "source": self.packaged, "files": [self.packaged]}
        if self.random:
            return {**out, "source": "random (seeded, from the architecture's config)"}
        directory = Path(self.source) if self.local else None
        if directory is None:
            config = hub.cached_hub_file(self.source, "config.json", resolved.cache_dir)
            directory = Path(config).parent if config else None
        return {**out, "source": self.source, "files": weight_files(directory) if directory else []}


def family_defaults(family: str, image_size: int = 224) -> Preprocess:
    """Preprocessing of a family when the model has no ``preprocessor_config.json``."""
    if family == "dinov2":
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


def preprocess_from_processor_config(pc: dict[str, Any], family: str, image_size: int = 224) -> Preprocess:
    """A Preprocess from a ``preprocessor_config.json`` (CLIPImageProcessor / BitImageProcessor fields).

    The result gives the same pixels as transformers' processor built from the same fields; fields it cannot
    reproduce (a rescale other than 1/255, a non-square size) are a ModelSpecError.
    """
    base = family_defaults(family, image_size)
    if not pc.get("do_rescale", True) or not math.isclose(float(pc.get("rescale_factor", 1 / 255)), 1 / 255):
        raise ModelSpecError(f"unsupported preprocessing: do_rescale={pc.get('do_rescale')}, "
                             f"rescale_factor={pc.get('rescale_factor')} (only a rescale by 1/255 is supported)")
    resample = pc.get("resample", 3)
    interpolation = "bilinear" if resample in (2, "bilinear", "BILINEAR") else "bicubic"
    if pc.get("do_normalize", True):
        mean = tuple(pc.get("image_mean", base.mean))
        std = tuple(pc.get("image_std", base.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = pc.get("size", base.resize_size)
    squash = isinstance(size, dict) and "shortest_edge" not in size
    resize = _square(size, "size") if pc.get("do_resize", True) else base.resize_size
    crop = _square(pc.get("crop_size", resize), "crop_size") if pc.get("do_center_crop", True) else resize
    if squash:
        if crop != resize:
            raise ModelSpecError(f"unsupported preprocessing: resize to {size} then crop {crop}")
        return Preprocess(resize, resize, mean, std, interpolation, resize_mode="squash", style="transformers")
    return Preprocess(crop, resize, mean, std, interpolation, style="transformers")


def is_local_spec(body: str) -> bool:
    """True when an ``hf:`` body names a local directory (existing, or written as a path)."""
    if os.path.isdir(os.path.expanduser(body)):
        return True
    return body.startswith(("/", "./", "../", "~", ".\\")) or body.count("/") > 1 or "\\" in body


def _read_json(path: Path | str | None) -> dict[str, Any] | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tokenizer_vocab_size(directory: Path) -> int | None:
    """The vocabulary size of the tokenizer files in a directory, read from JSON (None: no tokenizer files)."""
    data = _read_json(directory / "tokenizer.json")
    if data is not None:
        vocab = data.get("model", {}).get("vocab", {})
        return len(vocab) + len(data.get("added_tokens", []))
    vocab_json = _read_json(directory / "vocab.json")
    return None if vocab_json is None else len(vocab_json)


def check_tokenizer_dir(spec: str, directory: Path) -> None:
    """ModelUnavailableError unless the directory holds a CLIP tokenizer with a real vocabulary."""
    size = tokenizer_vocab_size(directory)
    if size is None:
        raise ModelUnavailableError(spec, f"no tokenizer files ({' or '.join(TOKENIZER_FILES)}) in {directory}",
                                    hint="save the tokenizer next to the weights (tokenizer.save_pretrained(dir))")
    if size < MIN_VOCAB:
        raise ModelUnavailableError(spec, f"the tokenizer in {directory} has only {size} tokens: broken or "
                                          "placeholder tokenizer files", hint="save the model's real tokenizer there")


def weight_files(directory: Path) -> list[str]:
    """The files of the checkpoint in ``directory`` that transformers loads (every shard of a sharded one; the
    first format of :data:`WEIGHT_FILES` present), or []."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set((_read_json(path) or {}).get("weight_map", {}).values()))
            if shards and all((directory / s).is_file() for s in shards):
                return [str(directory / s) for s in shards]
            continue
        return [str(path)]
    return []


def has_weights(directory: Path) -> bool:
    """True when a directory holds a complete transformers checkpoint (all shards of a sharded one)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(path) or {}
            shards = set(index.get("weight_map", {}).values())
            if shards and all((directory / s).is_file() for s in shards):
                return True
            continue
        return True
    return False


def _family(spec: str, config: dict[str, Any], role: str) -> str:
    family = config.get("model_type", "")
    if family not in FAMILIES:
        raise ModelSpecError(f"bad model spec {spec!r}: model_type {family!r} in config.json is not supported "
                             f"(hf: supports {', '.join(FAMILIES)})")
    if role == "clip" and family != "clip":
        raise ModelSpecError(f"bad model spec {spec!r} for the clip role: a {family} model has no text tower")
    return family


def _dim(family: str, config: dict[str, Any]) -> int:
    if family == "dinov2":
        return int(config.get("hidden_size", 768))
    return int(config.get("projection_dim", 512))


def _clip_image_size(config: dict[str, Any]) -> int:
    return int(config.get("vision_config", {}).get("image_size", 224))


def _preprocess(family: str, config: dict[str, Any], processor: dict[str, Any] | None) -> Preprocess:
    size = _clip_image_size(config) if family == "clip" else 224
    if processor is None:
        return family_defaults(family, size)
    return preprocess_from_processor_config(processor, family, size)


def resolve(spec: str, body: str, role: str, cache_dir: str | None) -> tuple[HfTarget, Preprocess, int]:
    """Check an ``hf:`` spec and that its weights can be had; (target, preprocess, dim)."""
    if not body:
        raise ModelSpecError(f"bad model spec {spec!r}: expected 'hf:ORG/NAME' or 'hf:/path/to/dir'")
    if is_local_spec(body):
        return _resolve_local(spec, Path(body).expanduser().resolve(), role)
    if not _HUB_ID.match(body):
        raise ModelSpecError(f"bad model spec {spec!r}: {body!r} is neither a directory nor a Hub id (ORG/NAME)")
    return _resolve_hub(spec, body, role, cache_dir)


def _resolve_local(spec: str, directory: Path, role: str) -> tuple[HfTarget, Preprocess, int]:
    if not directory.is_dir():
        raise ModelUnavailableError(spec, f"the directory {directory} does not exist")
    config = _read_json(directory / "config.json")
    if config is None:
        raise ModelUnavailableError(spec, f"no config.json in {directory}")
    family = _family(spec, config, role)
    if not has_weights(directory):
        raise ModelUnavailableError(spec, f"no weights ({' / '.join(WEIGHT_FILES)}) in {directory}")
    if role == "clip":
        check_tokenizer_dir(spec, directory)
    preprocess = _preprocess(family, config, _read_json(directory / "preprocessor_config.json"))
    return HfTarget(family, str(directory), local=True), preprocess, _dim(family, config)


def _resolve_hub(spec: str, repo_id: str, role: str, cache_dir: str | None) -> tuple[HfTarget, Preprocess, int]:
    config_path = hub.cached_hub_file(repo_id, "config.json", cache_dir)
    snapshot = Path(config_path).parent if config_path else None
    complete = snapshot is not None and has_weights(snapshot)
    if complete and role == "clip" and tokenizer_vocab_size(snapshot) is None:
        complete = False
    if not complete:
        probe = hub.probe_hub_file(repo_id, "config.json")
        if not probe.exists:
            where = "only partly in" if snapshot else "not in"
            raise ModelUnavailableError(
                spec, f"the Hugging Face repo {repo_id} is {where} the cache {hub.hub_cache_dir(cache_dir)} "
                      f"and cannot be downloaded ({probe.reason})",
                hint=f"on a machine with internet: `hf download {repo_id}` and copy its cache here")
        config_path = config_path or _download_small(repo_id, "config.json", cache_dir)
        if config_path is None:
            raise ModelUnavailableError(spec, f"could not download config.json of {repo_id}")
    config = _read_json(config_path) or {}
    family = _family(spec, config, role)
    processor_path = hub.cached_hub_file(repo_id, "preprocessor_config.json", cache_dir)
    if processor_path is None and not complete:
        processor_path = _download_small(repo_id, "preprocessor_config.json", cache_dir)
    if role == "clip" and complete:
        check_tokenizer_dir(spec, snapshot)
    preprocess = _preprocess(family, config, _read_json(processor_path))
    return HfTarget(family, repo_id, local=False), preprocess, _dim(family, config)


def _download_small(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """Download one small file (the Hub was just seen reachable); None when it does not exist or fails."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=hub.hub_cache_dir(cache_dir),
                               etag_timeout=hub.probe_timeout())
    except Exception as exc:  # noqa: BLE001 - a missing optional file is not an error
        logger.debug("could not download %s of %s: %s", filename, repo_id, exc)
        return None


def resolve_random(spec: str, body: str, role: str) -> tuple[HfTarget, Preprocess, int]:
    """An ``hf-random:NAME`` spec: a known architecture, random weights; (target, preprocess, dim)."""
    name = body.split("/")[-1].lower()
    if name not in RANDOM_ARCHITECTURES:
        raise ModelSpecError(f"bad model spec {spec!r}: hf-random knows {', '.join(RANDOM_ARCHITECTURES)}")
    family, config = RANDOM_ARCHITECTURES[name]
    _family(spec, {"model_type": family}, role)
    dim = int(config["projection_dim"]) if family == "clip" else int(config["hidden_size"])
    preprocess = family_defaults(family, int(config.get("vision_config", {}).get("image_size", 224)))
    return HfTarget(family, "", local=False, config_json=json.dumps(config, sort_keys=True)), preprocess, dim


def tiny_dino_target(weights: str = "") -> HfTarget:
    """The target of ``tiny-dino`` (a Dinov2Model from the packaged config), or of ``probe-dino`` with
    ``weights`` the path of its weights file (the same architecture, trained: :mod:`.packaged`)."""
    config = json.dumps(tiny.load_config(tiny.TINY_DINO), sort_keys=True)
    return HfTarget("dinov2", "", local=False, config_json=config, packaged=weights)


def build_clip_tokenizer_from_open_clip(context_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's BPE file (OpenAI CLIP's vocabulary).

    It gives the same token ids as open_clip's tokenizer; used for ``hf-random:clip-*`` and to write a
    tokenizer next to locally saved CLIP weights (``tokenizer.save_pretrained(dir)``).
    """
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)},
                         merges=merges, model_max_length=context_length)


def build_random(target: HfTarget) -> Any:
    """A model of ``target.config`` with seeded random weights, on the CPU in fp32."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    config = json.loads(target.config_json)
    with tiny.seeded():
        if target.family == "dinov2":
            return Dinov2Model(Dinov2Config(**config))
        return CLIPModel(CLIPConfig(**config))


def _from_pretrained(resolved: ResolvedModel, target: HfTarget, loader: Any, **kwargs: Any) -> Any:
    """``loader(source)`` from local files first; from the Hub only when local files fail and it can be reached."""
    if target.local:
        return loader(target.source, local_files_only=True, **kwargs)
    cache = {"cache_dir": hub.hub_cache_dir(resolved.cache_dir)} if resolved.cache_dir else {}
    try:
        return loader(target.source, local_files_only=True, **cache, **kwargs)
    except OSError as exc:
        probe = hub.probe_hub_file(target.source, "config.json")
        if not probe.exists:
            raise ModelUnavailableError(resolved.spec, f"{target.source} is not (fully) in the Hugging Face cache "
                                                       f"on this machine and cannot be downloaded ({probe.reason})"
                                        ) from exc
    return loader(target.source, **cache, **kwargs)


def load(resolved: ResolvedModel, target: HfTarget, device: str) -> HfClipModel | HfDinoModel:
    """Load (or build, for random targets) the model of an ``hf:`` / ``hf-random:`` / ``tiny-dino`` target."""
    import torch
    from transformers import AutoTokenizer, CLIPModel, Dinov2Model

    model_cls = CLIPModel if target.family == "clip" else Dinov2Model
    if target.packaged:
        model = build_random(target)
        packaged.load_state(model, packaged.checked_file(target.packaged))
    elif target.random:
        model = build_random(target)
    else:
        model = _from_pretrained(resolved, target, model_cls.from_pretrained, dtype=torch.float32)
    if target.family == "dinov2":
        return HfDinoModel(resolved.spec, model, device, resolved.preprocess)
    if target.random:
        tokenizer = build_clip_tokenizer_from_open_clip(model.config.text_config.max_position_embeddings)
    else:
        tokenizer = _from_pretrained(resolved, target, AutoTokenizer.from_pretrained)
    if len(tokenizer) < MIN_VOCAB:
        raise ModelUnavailableError(resolved.spec, f"the tokenizer of {target.source} has only {len(tokenizer)} "
                                                   "tokens: its files are missing or broken")
    return HfClipModel(resolved.spec, model, tokenizer, device, resolved.preprocess)


class HfDinoModel:
    """A loaded DINOv2 (image only): the CLS token after the final layernorm, L2-normalised.

    On CUDA the weights are fp16 and batches travel through pinned memory; on the CPU everything is fp32.
    """

    logit_scale: float = float("nan")

    def __init__(self, spec: str, model: Any, device: str, preprocess: Preprocess) -> None:
        self.spec = spec
        self.device = str(device)
        self.dim = int(model.config.hidden_size)
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._shape = preprocess.output_shape

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows (``pooler_output`` = layernormed CLS token)."""
        import torch

        check_pixels(pixels, self._shape, self.spec)
        if len(pixels) == 0:
            return empty_rows(self.dim)
        with torch.inference_mode():
            batch = batch_to_device(pixels, self.device, self._dtype)
            return tensor_to_unit_rows(self._model(pixel_values=batch).pooler_output)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """DINOv2 has no text tower: always TypeError."""
        raise TypeError(f"{self.spec} is an image-only model: it cannot encode texts")


class HfClipModel:
    """A loaded transformers CLIPModel: projected image and text features, L2-normalised float32."""

    def __init__(self, spec: str, model: Any, tokenizer: Any, device: str, preprocess: Preprocess) -> None:
        import torch

        self.spec = spec
        self.device = str(device)
        self.dim = int(model.config.projection_dim)
        with torch.inference_mode():
            self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        self._context = int(model.config.text_config.max_position_embeddings)
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._tokenizer = tokenizer
        self._shape = preprocess.output_shape

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows."""
        import torch

        check_pixels(pixels, self._shape, self.spec)
        if len(pixels) == 0:
            return empty_rows(self.dim)
        with torch.inference_mode():
            batch = batch_to_device(pixels, self.device, self._dtype)
            return tensor_to_unit_rows(self._model.get_image_features(pixel_values=batch).pooler_output)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, unit rows (truncated to the model's context length)."""
        import torch

        if len(texts) == 0:
            return empty_rows(self.dim)
        tokens = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._context,
                                 return_tensors="pt")
        with torch.inference_mode():
            inputs = {k: batch_to_device(v.numpy(), self.device) for k, v in tokens.items()
                      if k in ("input_ids", "attention_mask")}
            return tensor_to_unit_rows(self._model.get_text_features(**inputs).pooler_output)
