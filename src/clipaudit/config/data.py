"""What is audited: the corpus (``dataset``) and the models (``models``), and the slot names of several models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from clipaudit.config.errors import ConfigError


@dataclass(frozen=True)
class DatasetConfig:
    """Where the captioned corpus comes from and how it is read."""

    format: Literal["flickr8k", "manifest", "imagefolder", "webdataset", "hf_dataset", "clip_retrieval",
                    "synthetic"] = "synthetic"
    captions: str | None = None
    """flickr8k: ``Flickr8k.token.txt`` or the CSV ``image,caption`` file. manifest: the CSV/JSONL/Parquet file."""
    images: str | None = None
    """flickr8k: the image folder. imagefolder: the root with one folder per class.
    webdataset: a folder of .tar shards or one .tar. manifest (optional): the folder relative image paths are
    taken from (default: the manifest's own folder). clip_retrieval (optional): the folder relative ``image_path``
    values are taken from (default: the index folder's parent)."""
    caption_choice: Literal["longest", "first"] = "longest"
    path: str | None = None
    """hf_dataset: a ``save_to_disk`` folder, a Parquet / Arrow file or a folder of them (local or s3://), or
    ``ORG/NAME``, a dataset in the Hugging Face hub cache. clip_retrieval: the output folder of clip-retrieval's
    ``inference`` (``metadata/``, ``img_emb/``, optionally ``text_emb/``; local or s3://)."""
    split: str | None = None
    """hf_dataset: the split of a DatasetDict folder (default ``train``), or the prefix of the data files' names."""
    image_column: str = "image"
    """manifest: column holding an image path (relative to ``images``, else to the manifest's folder) or URL.
    hf_dataset: column holding ``datasets.Image`` values, image bytes, or paths."""
    caption_columns: list[str] = field(default_factory=lambda: ["caption"])
    """manifest: one or more caption columns; a column may hold a string or a list of strings."""
    id_column: str | None = None
    """manifest: optional column holding the image_id; None derives it from the image path or URL."""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {label}."])
    """imagefolder: caption templates filled with the class name."""
    class_names: str | None = None
    """imagefolder: optional file mapping folder names (e.g. synset ids) to readable names."""
    limit: int | None = None
    """Keep only the first N samples (by image_id order); None keeps all."""
    duplicate_check: Literal["content", "uri"] = "content"
    """Which samples are duplicates besides a repeated image_id: ``content``: the same uri, or files of equal
    size and equal SHA-256 (only size collisions are read; http URLs by uri only); ``uri``: the same uri only
    (no stat per file: for very large remote corpora)."""
    num_images: int = 64
    """synthetic: how many scenes to generate."""
    seed: int = 0
    """synthetic: the generator seed."""
    variants: int = 0
    """synthetic: after each drawn scene, this many minimal variants of it (one attribute of one group changed,
    cycling kind, colour, count, position): the minimal pairs that show which attribute a model misses."""

    def __post_init__(self) -> None:
        unread = unread_dataset_keys(self)
        if unread:
            key = unread[0]
            raise ConfigError(f"dataset.{key}: format {self.format} does not read this key (it reads: "
                              f"{', '.join(sorted(FORMAT_KEYS[self.format] | COMMON_DATASET_KEYS))}); "
                              f"remove dataset.{key} or change dataset.format")


COMMON_DATASET_KEYS = frozenset({"format", "caption_choice", "limit", "duplicate_check"})
"""Dataset keys that every format reads (the ingest stage applies them after the reader)."""
FORMAT_KEYS: dict[str, frozenset[str]] = {
    "flickr8k": frozenset({"captions", "images"}),
    "manifest": frozenset({"captions", "images", "image_column", "caption_columns", "id_column"}),
    "imagefolder": frozenset({"images", "templates", "class_names"}),
    "webdataset": frozenset({"images"}),
    "hf_dataset": frozenset({"path", "split", "image_column", "caption_columns", "id_column"}),
    "clip_retrieval": frozenset({"path", "images"}),
    "synthetic": frozenset({"num_images", "seed", "variants"}),
}
"""The dataset keys each format's reader reads, besides :data:`COMMON_DATASET_KEYS`."""


def unread_dataset_keys(dataset: DatasetConfig) -> list[str]:
    """Keys of ``dataset`` set to something other than their default that its format does not read, in field
    order (a key left at its default is not an error: it changes nothing either way)."""
    defaults = DatasetConfig.__dataclass_fields__
    read = FORMAT_KEYS.get(dataset.format, frozenset()) | COMMON_DATASET_KEYS
    unread = []
    for name, spec in defaults.items():
        if name in read:
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if getattr(dataset, name) != default:
            unread.append(name)
    return unread


def slot_name(role: str, index: int) -> str:
    """The slot of the ``index``-th model of a role (0-based): ``clip``, ``clip_2``, ... / ``reference``, ..."""
    return role if index == 0 else f"{role}_{index + 1}"


@dataclass(frozen=True)
class ModelsConfig:
    """Which models fill the CLIP role and the reference (DINOv2) role; specs resolved by the model registry."""

    clip: str | list[str] = "open_clip:ViT-B-32/openai"
    """One spec, or a list of specs audited side by side in one run (one leaderboard row each); every table of
    CLIP-role results keys its rows by ``clip_model``, the spec as written here."""
    reference: str | list[str] = "hf:facebook/dinov2-base"
    """One spec, or a list: a DAF case then needs every reference (``daf.consensus: all``) or any of them (``any``)
    to disagree with the CLIP model; rows of the reference role carry ``reference_model``, the spec as written."""
    fallback: Literal["none", "tiny"] = "none"
    """``tiny``: when a model's weights cannot be had, use tiny-clip / tiny-dino (random: findings meaningless)."""
    cache_dir: str | None = None
    """Where model weights are looked up (open_clip / Hugging Face cache); None: their defaults."""

    def __post_init__(self) -> None:
        for key, specs in (("clip", self.clip_models), ("reference", self.reference_models)):
            if not specs:
                raise ConfigError(f"models.{key}: the list is empty (give at least one model spec)")
            for i, spec in enumerate(specs):
                if not spec.strip():
                    raise ConfigError(f"models.{key}[{i}]: an empty spec")
            repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
            if repeated:
                raise ConfigError(f"models.{key}: {repeated[0]!r} is listed more than once")

    @property
    def clip_models(self) -> list[str]:
        """The CLIP-role specs, in config order (one element when ``clip`` is a single spec)."""
        return [self.clip] if isinstance(self.clip, str) else list(self.clip)

    @property
    def clip_slots(self) -> dict[str, str]:
        """Slot name -> spec of every CLIP-role model, in config order: ``clip``, then ``clip_2``, ``clip_3``, ...
        (the names of their columns in batches and of their counts in the stats)."""
        return {slot_name("clip", i): spec for i, spec in enumerate(self.clip_models)}

    @property
    def reference_models(self) -> list[str]:
        """The reference specs, in config order (one element when ``reference`` is a single spec)."""
        return [self.reference] if isinstance(self.reference, str) else list(self.reference)

    @property
    def reference_slots(self) -> dict[str, str]:
        """Slot name -> spec of every reference model: ``reference``, then ``reference_2``, ..."""
        return {slot_name("reference", i): spec for i, spec in enumerate(self.reference_models)}
