"""``hf:ID_OR_PATH`` and ``hf-random:NAME`` models (transformers): the families of :mod:`.hf_families`.

- ``hf:openai/clip-vit-base-patch32``, ``hf:google/siglip-base-patch16-224``, ``hf:kakaobrain/align-base``,
  ``hf:facebook/dinov2-base``, ``hf:facebook/dinov3-vits16-pretrain-lvd1689m``, ``hf:/path/to/dir``: the family
  is read from ``config.json`` (``model_type``); any other vision model loads through ``AutoModel`` with a stated
  pooling (``hf:ORG/NAME#mean``, ``#cls``, ``#pooler``). An existing directory is a local model (a
  directory written by ``save_pretrained``); anything else of the form ``org/name`` is a Hub id, looked up in the
  Hugging Face cache first (``local_files_only=True``) and downloaded only when the Hub can be reached.
- ``hf-random:dinov2-small`` (also ``dinov2-base``, ``dinov2-large``, ``dinov2-giant``, ``clip-vit-base-patch32``,
  ``clip-vit-base-patch16``, ``clip-vit-large-patch14``): the real architecture built offline from its config
  with seeded random weights: the same compute as the real model, for benchmarks; findings meaningless.

Embeddings (:mod:`.hf_encoders`): dual encoders through ``get_image_features`` / ``get_text_features``;
image encoders through the family's pooling (DINOv2's ``pooler_output`` is the CLS token after the final layer
norm, ``layernorm(last_hidden_state)[:, 0]``); all L2-normalised.

Preprocessing comes from the model's ``preprocessor_config.json`` when present, else the family's defaults, with
the pixels of transformers' own image processor (:mod:`.hf_processor`).

Tokenizers (dual encoders) load from the model's own files; a tokenizer of fewer than 1000 tokens (what
transformers returns when the files are missing) is an error, never used.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hub, packaged, tiny
from .errors import ModelSpecError, ModelUnavailableError
from .hf_encoders import HfDualEncoder, HfImageEncoder
from .hf_families import (
    FAMILIES,
    GENERIC,
    Family,
    embedding_dim,
    family_of,
    model_image_size,
    roles_of,
    split_pooling,
)
from .hf_processor import family_defaults, preprocess_from_processor_config
from .preprocess import Preprocess

if TYPE_CHECKING:
    from .base import LoadedModel
    from .resolved import ResolvedModel

logger = logging.getLogger(__name__)

MIN_VOCAB = 1000
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
"""A sentencepiece model: SigLIP 1's tokenizer (``spiece.model``, no ``tokenizer.json``), T5's, Llama's."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", *SENTENCEPIECE_FILES)
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
    """The ``model_type`` (see :mod:`.hf_families`)."""
    source: str
    local: bool
    config_json: str = ""
    packaged: str = ""
    """``probe-dino``: built from ``config_json``, then this weights file (:mod:`.packaged`)."""
    pooling: str | None = None
    """Image encoders: how the output becomes one vector (``pooler``, ``cls``, ``mean``)."""

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
    """The vocabulary size of the tokenizer files in a directory, read from ``tokenizer.json``, a BPE
    ``vocab.json``, a WordPiece ``vocab.txt`` (BERT's, ALIGN's: one token a line) or a sentencepiece model
    (SigLIP 1's ``spiece.model``; 0 when it cannot be read); None: no tokenizer files."""
    data = _read_json(directory / "tokenizer.json")
    if data is not None:
        vocab = data.get("model", {}).get("vocab", {})
        return len(vocab) + len(data.get("added_tokens", []))
    vocab_json = _read_json(directory / "vocab.json")
    if vocab_json is not None:
        return len(vocab_json)
    vocab_txt = directory / "vocab.txt"
    if vocab_txt.is_file():
        return sum(1 for line in vocab_txt.read_text(encoding="utf-8").splitlines() if line.strip())
    for name in SENTENCEPIECE_FILES:
        if (directory / name).is_file():
            return _sentencepiece_size(directory / name)
    return None


def _sentencepiece_size(path: Path) -> int:
    """The pieces of a sentencepiece model file; 0 when it is not one (a broken download, a placeholder)."""
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size())
    except (OSError, RuntimeError):
        return 0


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
    return bool(weight_files(directory))


def _preprocess(family: Family, config: dict[str, Any], processor: dict[str, Any] | None) -> Preprocess:
    name = family.model_type if family.model_type in FAMILIES else GENERIC
    if processor is None:
        return family_defaults(name, model_image_size(family, config))
    return preprocess_from_processor_config(processor, name, model_image_size(family, config))


def resolve(spec: str, body: str, role: str, cache_dir: str | None) -> tuple[HfTarget, Preprocess, int | None]:
    """Check an ``hf:`` spec and that its weights can be had; (target, preprocess, dim)."""
    if not body:
        raise ModelSpecError(f"bad model spec {spec!r}: expected 'hf:ORG/NAME' or 'hf:/path/to/dir'")
    body, pooling = split_pooling(spec, body)
    if is_local_spec(body):
        return _resolve_local(spec, Path(body).expanduser().resolve(), role, pooling)
    if not _HUB_ID.match(body):
        raise ModelSpecError(f"bad model spec {spec!r}: {body!r} is neither a directory nor a Hub id (ORG/NAME)")
    return _resolve_hub(spec, body, role, cache_dir, pooling)


def _resolve_local(spec: str, directory: Path, role: str, pooling: str | None
                   ) -> tuple[HfTarget, Preprocess, int | None]:
    if not directory.is_dir():
        raise ModelUnavailableError(spec, f"the directory {directory} does not exist")
    config = _read_json(directory / "config.json")
    if config is None:
        raise ModelUnavailableError(spec, f"no config.json in {directory}")
    family, pooling = family_of(spec, config, role, pooling)
    if not has_weights(directory):
        raise ModelUnavailableError(spec, f"no weights ({' / '.join(WEIGHT_FILES)}) in {directory}")
    if role == "clip":
        check_tokenizer_dir(spec, directory)
    preprocess = _preprocess(family, config, _read_json(directory / "preprocessor_config.json"))
    target = HfTarget(family.model_type, str(directory), local=True, pooling=pooling)
    return target, preprocess, embedding_dim(family, config)


def _resolve_hub(spec: str, repo_id: str, role: str, cache_dir: str | None, pooling: str | None
                 ) -> tuple[HfTarget, Preprocess, int | None]:
    config_path = hub.cached_hub_file(repo_id, "config.json", cache_dir)
    snapshot = Path(config_path).parent if config_path else None
    if config_path:
        family_of(spec, _read_json(config_path) or {}, role, pooling)
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
    family, pooling = family_of(spec, config, role, pooling)
    processor_path = hub.cached_hub_file(repo_id, "preprocessor_config.json", cache_dir)
    if processor_path is None and not complete:
        processor_path = _download_small(repo_id, "preprocessor_config.json", cache_dir)
    if role == "clip" and complete:
        check_tokenizer_dir(spec, snapshot)
    preprocess = _preprocess(family, config, _read_json(processor_path))
    target = HfTarget(family.model_type, repo_id, local=False, pooling=pooling)
    return target, preprocess, embedding_dim(family, config)


def _download_small(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """Download one small file (the Hub was just seen reachable); None when it does not exist or fails."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=hub.hub_cache_dir(cache_dir),
                               etag_timeout=hub.probe_timeout())
    except Exception as exc:  # noqa: BLE001 - a missing optional file is not an error
        logger.debug("could not download %s of %s: %s", filename, repo_id, exc)
        return None


def roles(spec: str, body: str, cache_dir: str | None) -> tuple[str, ...] | None:
    """The roles an ``hf:`` spec can fill, read from its ``config.json`` alone, no weights
    (:func:`~clipaudit.models.hf_families.roles_of`); None where there is no config to read (resolving the spec
    says why). The config comes from the local directory or the hub cache, or is downloaded (a small file, as
    :func:`resolve` downloads it) when the cache lacks it and the Hub answers."""
    source, pooling = split_pooling(spec, body)
    config = _read_json(_config_path(source, cache_dir))
    return None if config is None else roles_of(spec, config, pooling)


def _config_path(source: str, cache_dir: str | None) -> Path | str | None:
    """Where ``config.json`` of an ``hf:`` source is on this machine (downloaded if need be), or None."""
    if is_local_spec(source):
        return Path(source).expanduser().resolve() / "config.json"
    if not _HUB_ID.match(source):
        return None
    found = hub.cached_hub_file(source, "config.json", cache_dir)
    if found is None and hub.probe_hub_file(source, "config.json").exists:
        found = _download_small(source, "config.json", cache_dir)
    return found


def _random_architecture(spec: str, body: str) -> tuple[str, dict[str, Any]]:
    """(family, config) of an ``hf-random:NAME`` spec; ModelSpecError for an unknown name."""
    name = body.split("/")[-1].lower()
    if name not in RANDOM_ARCHITECTURES:
        raise ModelSpecError(f"bad model spec {spec!r}: hf-random knows {', '.join(RANDOM_ARCHITECTURES)}")
    return RANDOM_ARCHITECTURES[name]


def random_roles(spec: str, body: str) -> tuple[str, ...]:
    """The roles an ``hf-random:NAME`` spec can fill (its architecture's family's); ModelSpecError for an unknown
    name."""
    return FAMILIES[_random_architecture(spec, body)[0]].roles


def resolve_random(spec: str, body: str, role: str) -> tuple[HfTarget, Preprocess, int]:
    """An ``hf-random:NAME`` spec: a known architecture, random weights; (target, preprocess, dim)."""
    family, config = _random_architecture(spec, body)
    family_of(spec, {"model_type": family}, role, None)
    dim = int(config["projection_dim"]) if family == "clip" else int(config["hidden_size"])
    preprocess = family_defaults(family, int(config.get("vision_config", {}).get("image_size", 224)))
    target = HfTarget(family, "", local=False, config_json=json.dumps(config, sort_keys=True),
                      pooling=None if family == "clip" else "pooler")
    return target, preprocess, dim


def tiny_dino_target(weights: str = "") -> HfTarget:
    """The target of ``tiny-dino`` (a Dinov2Model from the packaged config), or of ``probe-dino`` with
    ``weights`` the path of its weights file (the same architecture, trained: :mod:`.packaged`)."""
    config = json.dumps(tiny.load_config(tiny.TINY_DINO), sort_keys=True)
    return HfTarget("dinov2", "", local=False, config_json=config, packaged=weights, pooling="pooler")


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


def model_class(target: HfTarget) -> Any:
    """The transformers class that loads ``target``: its family's, or ``AutoModel`` for any other vision model."""
    import transformers

    family = FAMILIES.get(target.family)
    return getattr(transformers, family.model_class if family else "AutoModel")


def load(resolved: ResolvedModel, target: HfTarget, device: str) -> HfDualEncoder | HfImageEncoder:
    """Load (or build, for random targets) the model of an ``hf:`` / ``hf-random:`` / ``tiny-dino`` target."""
    import torch
    from transformers import AutoTokenizer

    if target.packaged:
        model = build_random(target)
        packaged.load_state(model, packaged.checked_file(target.packaged))
    elif target.random:
        model = build_random(target)
    else:
        model = _from_pretrained(resolved, target, model_class(target).from_pretrained, dtype=torch.float32)
    family = FAMILIES.get(target.family)
    if family is None or not family.dual:
        return HfImageEncoder(resolved.spec, model, device, resolved.preprocess, target.pooling or "pooler",
                              resolved.dim)
    if target.random:
        tokenizer = build_clip_tokenizer_from_open_clip(model.config.text_config.max_position_embeddings)
    else:
        try:
            tokenizer = _from_pretrained(resolved, target, AutoTokenizer.from_pretrained)
        except (ImportError, ValueError) as exc:
            raise ModelUnavailableError(resolved.spec, f"its tokenizer cannot be built here ({exc})",
                                        hint="the message names what failed: a tokenizer file, or a library "
                                             "its tokenizer class needs") from exc
    if len(tokenizer) < MIN_VOCAB:
        raise ModelUnavailableError(resolved.spec, f"the tokenizer of {target.source} has only {len(tokenizer)} "
                                                   "tokens: its files are missing or broken")
    return HfDualEncoder(resolved.spec, model, tokenizer, device, resolved.preprocess, family)
