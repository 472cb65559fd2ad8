"""Typed run configuration: YAML plus ``--set key=value`` overrides, validated when loaded.

Every section is a frozen dataclass. :func:`load_config` reads YAML, applies dotted overrides,
builds the dataclasses field by field (an unknown key, a wrong type or a missing file is a
:class:`ConfigError` that names it) and resolves relative paths against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipaudit.errors import ClipauditError
from clipaudit.transforms import CORRUPTION_NAMES, LEVELS, TRANSFORM_NAMES, TransformParams, expand, parse_graded


class ConfigError(ClipauditError, ValueError):
    """A configuration problem, reported before any work starts; the message names the key or file."""


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


@dataclass(frozen=True)
class EmbedConfig:
    """How the embed stage sizes its work."""

    batch_size: int = 32
    """Images per model forward."""
    text_batch_size: int = 256
    """Captions per text-tower forward."""
    actors_per_model: int = 1
    """Actor pool size per model role (per GPU on a GPU cluster)."""
    cpus_per_actor: float | None = None
    """CPU share reserved by each model actor when no GPU is used. None (the default): 0.5, halved until every
    model actor of the stage and a decode task fit on the nodes (three CLIP models and a reference on one 2-CPU
    machine: 0.25 each). A value set here is kept as it is, and a plan it does not fit is refused with the reason
    (on 2 CPUs, two actors at 1 CPU each would leave the readers nothing)."""
    gpus_per_actor: float = 1.0
    """GPU share of each model actor when a GPU is used."""
    torch_threads: int = 0
    """Intra-op threads per CPU actor; 0: the CPU share rounded up."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are rejected as too large (decompression-bomb guard)."""
    write_every: int = 2048
    """Rows buffered before one write to LanceDB (few large writes, not many small)."""
    max_reject_share: float = 0.05
    """The embed and tcac stages fail when they reject more than this share of the images they tried (and more
    than one image); 1: never. Rejected rows are in ``rejects`` either way."""


@dataclass(frozen=True)
class RayConfig:
    """How Ray is reached: a local instance by default, or an existing cluster."""

    address: str | None = None
    """None: start a local Ray; ``auto`` or ``ray://host:port``: join that cluster."""
    num_cpus: int | None = None
    """Local Ray only: CPUs to use (None: all)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: GPU actors with fp16 when the cluster has GPUs, CPU otherwise."""
    runner: Literal["ray", "local"] = "ray"
    """``local``: run the batch work in-process without Ray (debugging, tiny corpora)."""
    actor_start_timeout_s: int = 900
    """A stage whose model actors have not all started after this long fails (a backstop: the placement check
    refuses plans that cannot fit before any work; this covers nodes that never come, e.g. an autoscaler out of
    quota). Leave room for an autoscaler to launch GPU nodes."""

    task_retries: int = 2
    """Times Ray re-runs a CPU task (decode, resize) whose worker died, before the rows behind it are isolated
    (see :mod:`clipaudit.batches.isolation`)."""
    autoscale_timeout_s: int = 600
    """On a cluster with an autoscaler: how long a stage waits for the nodes its plan asked the autoscaler for
    before it fails (saying what it asked for, what came, and how long it waited)."""
    node_loss_retries: int = 3
    """Times a stage's distributed run is started again, for the rows not yet back, after a node of the cluster
    was lost (a reclaimed spot instance); a node loss never makes a row a reject."""

    def __post_init__(self) -> None:
        if self.actor_start_timeout_s < 1:
            raise ConfigError(f"ray.actor_start_timeout_s: must be at least 1, got {self.actor_start_timeout_s}")
        if self.autoscale_timeout_s < 1:
            raise ConfigError(f"ray.autoscale_timeout_s: must be at least 1, got {self.autoscale_timeout_s}")
        if self.node_loss_retries < 0:
            raise ConfigError(f"ray.node_loss_retries: must be at least 0, got {self.node_loss_retries}")
        if self.task_retries < 0:
            raise ConfigError(f"ray.task_retries: must be at least 0, got {self.task_retries}")


@dataclass(frozen=True)
class NeighboursConfig:
    """Nearest-neighbour search settings (the neighbours stage), checked when built."""

    k: int = 10
    """Neighbours per image and model role, the image itself excluded; must be smaller than the image count."""
    block_size: int | None = None
    """Rows per block of the exact search; None: chosen from a memory budget (see :mod:`clipaudit.knn`)."""
    method: Literal["exact", "ann"] = "exact"
    """``exact``: blocked matmul top-k; ``ann``: a LanceDB vector index, its recall@k measured on a sample."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the exact search runs: ``auto`` is CUDA (fp16 products) when torch sees a GPU, else CPU (fp32)."""
    ann_index: Literal["IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ"] = "IVF_HNSW_SQ"
    """ann: the LanceDB index type (cosine distance)."""
    ann_partitions: int | None = None
    """ann: IVF partitions; None: about sqrt(N)."""
    ann_nprobes: int = 20
    """ann: partitions searched per query."""
    ann_refine_factor: int = 5
    """ann: candidates re-ranked with exact distances, as a multiple of k; 0: no refinement."""
    recall_sample: int = 1000
    """ann: images whose ANN lists are compared with exact search (recall@k in the stats); 0: not measured."""
    seed: int = 0
    """Seeds the recall sample."""
    ray_min_images: int = 50_000
    """Exact searches over at least this many rows (images; captions for the TCAC pools) run on Ray workers
    when ``ray.runner`` is ``ray``; smaller ones, and every search under ``ray.runner: local``, in-process."""
    ray_workers: int | None = None
    """Ray top-k actors; None: one per GPU when the search runs on GPUs, else as many as the nodes' CPUs hold
    at ``ray_cpus_per_worker`` each."""
    ray_cpus_per_worker: float = 1.0
    """CPUs each top-k actor reserves (fractions allowed; capped at the smallest node's CPUs); it runs
    ``max(1, floor(cpus))`` torch threads."""
    lowp_margin: int = 10
    """Extra candidates per row searched in fp16 on a GPU before the exact fp32 re-score keeps k."""

    def __post_init__(self) -> None:
        problems = [f"neighbours.{key}: must be at least {low}, got {value}"
                    for key, value, low in (("k", self.k, 1), ("block_size", self.block_size, 1),
                                            ("ann_partitions", self.ann_partitions, 1),
                                            ("ann_nprobes", self.ann_nprobes, 1),
                                            ("ann_refine_factor", self.ann_refine_factor, 0),
                                            ("recall_sample", self.recall_sample, 0),
                                            ("ray_min_images", self.ray_min_images, 0),
                                            ("ray_workers", self.ray_workers, 1),
                                            ("lowp_margin", self.lowp_margin, 0))
                    if value is not None and value < low]
        if not self.ray_cpus_per_worker > 0:
            problems.append(f"neighbours.ray_cpus_per_worker: must be above 0, got {self.ray_cpus_per_worker}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DafConfig:
    """Discrepancy Analysis Framework settings (the daf stage), checked when built.

    Cases are the images with ``overlap <= max_overlap`` (when set), then at most the ``top_n`` most divergent
    of those (when set); at least one of the two must be set.
    """

    max_overlap: float | None = 0.1
    """Select images whose two top-k lists share at most this fraction of neighbours; None: no threshold."""
    top_n: int | None = None
    """Keep at most the N most divergent images (by score = 1 - RBO); None: no cap."""
    rbo_p: float = 0.9
    """Persistence of rank-biased overlap, in (0, 1): smaller weighs the top ranks more."""
    rbo: Literal["extrapolated", "truncated"] = "extrapolated"
    """``extrapolated``: RBO_ext (identical lists 1, disjoint 0); ``truncated``: the sum to depth k divided by
    its maximum 1 - p^k (also 1 and 0)."""
    permutations: int = 200
    """Permutations of the null (reference lists shuffled across images); 0: no null."""
    null_sample: int = 20_000
    """Images per permutation of the null (a seeded sample when the corpus is larger)."""
    seed: int = 0
    """Seeds the permutation null."""
    blind_rule: Literal["absolute", "quantile"] = "absolute"
    """CLIP-blind pairs: ``absolute`` thresholds, or ``quantile`` thresholds over the CLIP neighbour pairs."""
    blind_clip_min: float = 0.95
    """absolute: CLIP similarity at least this."""
    blind_reference_max: float = 0.6
    """absolute: reference similarity at most this."""
    blind_clip_quantile: float = 0.9
    """quantile: CLIP similarity at least this quantile of the neighbour pairs' CLIP similarities."""
    blind_reference_quantile: float = 0.1
    """quantile: reference similarity at most this quantile of the neighbour pairs' reference similarities."""
    consensus: Literal["all", "any"] = "all"
    """With several reference models: ``all``: an image is a case, and a pair CLIP-blind, only when every reference
    disagrees with CLIP (fewer false alarms: one reference can be the one that is wrong); ``any``: when one does."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_overlap is None and self.top_n is None:
            problems.append("daf.max_overlap and daf.top_n: set at least one of them (the case selection rule)")
        for key, value in (("max_overlap", self.max_overlap), ("blind_clip_quantile", self.blind_clip_quantile),
                           ("blind_reference_quantile", self.blind_reference_quantile)):
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"daf.{key}: must be in [0, 1], got {value}")
        if not 0.0 < self.rbo_p < 1.0:
            problems.append(f"daf.rbo_p: must be in (0, 1), got {self.rbo_p}")
        for key, value, low in (("top_n", self.top_n, 1), ("permutations", self.permutations, 0),
                                ("null_sample", self.null_sample, 1)):
            if value is not None and value < low:
                problems.append(f"daf.{key}: must be at least {low}, got {value}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class TcacConfig:
    """Transformative Caption Analysis settings, checked when built: an unknown transform, a repeated one or an
    out-of-range parameter is a :class:`ConfigError` naming the key (``tcac.params.rotation.degrees``).

    ``transforms`` is stored expanded: a bare corruption becomes its graded names at ``severities``."""

    seed: int = 0
    """Seeds every transform's random parameters, per (seed, image_id, transform)."""
    transforms: list[str] = field(default_factory=lambda: list(TRANSFORM_NAMES))
    """Which transforms to apply, each at most once: the paper's seven (see :mod:`clipaudit.transforms`), graded
    corruptions at one level (``gaussian_blur@3``), or a corruption at every level of ``severities``
    (``gaussian_blur``; see :mod:`clipaudit.transforms.severities`)."""
    severities: list[int] = field(default_factory=lambda: list(LEVELS))
    """The severity levels (1 mild to 5 severe) a bare corruption in ``transforms`` is applied at."""
    params: TransformParams = field(default_factory=TransformParams)
    """Per-transform parameters: ``tcac.params.rotation.degrees``, ``tcac.params.elastic.alpha``, ..."""
    cases_per_transform: int = 100
    """Rows marked ``is_case`` per transform: the top ones by changed captions (then total variation)."""
    pool_neighbours: int = 10
    """Nearest captions (CLIP text embedding) taken for each of an image's own captions into its pool."""
    top_k: int = 10
    """Length of the top-caption lists compared before and after a transform."""

    def __post_init__(self) -> None:
        repeated = sorted({name for name in self.transforms if self.transforms.count(name) > 1})
        if repeated:
            raise ConfigError(f"tcac.transforms: {repeated[0]!r} is listed more than once")
        bad_levels = [level for level in self.severities if level not in LEVELS]
        if bad_levels or not self.severities or len(set(self.severities)) != len(self.severities):
            raise ConfigError(f"tcac.severities: must be distinct levels among {', '.join(map(str, LEVELS))}, "
                              f"got {self.severities!r}")
        for index, name in enumerate(self.transforms):
            try:
                known = name in TRANSFORM_NAMES or name in CORRUPTION_NAMES or parse_graded(name) is not None
            except ValueError as exc:
                raise ConfigError(f"tcac.transforms[{index}]: {exc}") from exc
            if not known:
                raise ConfigError(f"tcac.transforms[{index}]: unknown transform {name!r} (known: "
                                  f"{', '.join(TRANSFORM_NAMES + CORRUPTION_NAMES)}, or CORRUPTION@LEVEL)")
        object.__setattr__(self, "transforms", expand(self.transforms, self.severities))
        problems = [f"tcac.params.{key}: {message}" for key, message in self.params.problems()]
        for key, value, low in (("cases_per_transform", self.cases_per_transform, 0),
                                ("pool_neighbours", self.pool_neighbours, 1), ("top_k", self.top_k, 1)):
            if value < low:
                problems.append(f"tcac.{key}: must be at least {low}, got {value}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible endpoint; the key is read from the environment variable named here, never stored."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str = "OPENAI_API_KEY"
    requests_per_minute: int = 500
    tokens_per_minute: int = 200_000
    max_in_flight: int = 32
    """Requests in flight at once, across every worker."""
    rate_window_s: float = 60.0
    """Seconds the two rate limits count over: 60 makes them per minute, as named; a shorter window (tests, a
    provider with per-second quotas) applies ``requests_per_minute`` / ``tokens_per_minute`` per that window."""
    workers: int = 2
    """Ray: async worker actors sharing one rate budget (``ray.runner: local``: one in-process worker)."""
    timeout_s: float = 60.0
    """Seconds one HTTP attempt may take."""
    max_retries: int = 4
    """Retries of a request after a 429, a 5xx, a timeout or a malformed response (Retry-After honoured)."""
    backoff_s: float = 0.5
    """Base of the exponential backoff between retries, seconds."""
    max_retry_after_s: float = 120.0
    """A Retry-After longer than this fails the request instead of waiting."""
    repair_rounds: int = 1
    """Follow-up requests asking for valid JSON after an unparseable answer; then it is a parse failure."""
    temperature: float = 0.0
    max_tokens: int = 1024
    """Completion tokens per request (also what the cost estimate counts as the most an answer costs)."""
    structured_output: bool = True
    """Ask for a JSON answer (``response_format`` json_schema); servers that reject it get a plain request."""
    methods: list[Literal["daf", "tcac"]] = field(default_factory=lambda: ["daf", "tcac"])
    """Which cases the summarize stage sends: ``daf_cases``, ``tcac_cases`` (its ``is_case`` rows)."""
    batch_tokens: int = 3000
    """Estimated prompt tokens per request: cases are packed into prompts up to this budget."""
    max_cases_per_batch: int = 25
    """At most this many cases in one prompt."""
    max_cases: int | None = None
    """At most this many DAF cases, and this many TCAC cases per transform, in rank order; None: all."""
    daf_template: str | None = None
    """A prompt template file for DAF cases; None: the paper's Figure 2 prompt (``llm/prompts/daf.txt``)."""
    tcac_template: str | None = None
    """A prompt template file for TCAC cases; None: ``llm/prompts/tcac.txt``."""
    merge_template: str | None = None
    """A prompt template file for ``merge: llm``; None: ``llm/prompts/merge.txt``."""
    validate_template: str | None = None
    """A prompt template file for the validate stage; None: ``llm/prompts/validate.txt``."""
    merge: Literal["text", "llm"] = "text"
    """How the failure types of all batches become one taxonomy: ``text``: near-duplicate names merged by
    token-set and character 3-gram similarity; ``llm``: one more request groups them."""
    merge_threshold: float = 0.6
    """text: names at least this similar (0..1) are merged."""
    max_examples: int = 8
    """Example image ids kept per failure type."""
    prices: dict[str, list[float]] = field(default_factory=lambda: {
        "gpt-3.5-turbo": [0.0005, 0.0015], "gpt-4o-mini": [0.00015, 0.0006], "gpt-4o": [0.0025, 0.01]})
    """USD per 1k prompt and per 1k completion tokens, per model (a key also prices the models it prefixes).
    Check your provider's current prices; an unpriced model gets no cost estimate."""
    batch_price_factor: float = 0.5
    """Share of the price charged for answers imported from the OpenAI Batch API (it costs half)."""
    dry_run: bool = False
    """Write the prompts and the cost estimate to ``run_dir/llm/`` and send nothing (``--dry-run``)."""
    export_batch: str | None = None
    """summarize: write the requests still unanswered as an OpenAI Batch API JSONL file and send nothing."""
    import_batch: str | None = None
    """summarize: read answers from an OpenAI Batch API output JSONL file instead of sending requests."""

    def __post_init__(self) -> None:
        problems = []
        if not _ENV_NAME.fullmatch(self.api_key_env or ""):
            problems.append("llm.api_key_env: must be the NAME of an environment variable (letters, digits, _), "
                            "never the key itself")
        for key in ("requests_per_minute", "tokens_per_minute", "max_in_flight", "workers", "max_tokens",
                    "batch_tokens", "max_cases_per_batch", "max_examples"):
            if getattr(self, key) < 1:
                problems.append(f"llm.{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("max_retries", "repair_rounds", "temperature", "backoff_s", "max_retry_after_s",
                    "batch_price_factor"):
            if getattr(self, key) < 0:
                problems.append(f"llm.{key}: must be at least 0, got {getattr(self, key)}")
        for key in ("rate_window_s", "timeout_s"):
            if getattr(self, key) <= 0:
                problems.append(f"llm.{key}: must be positive, got {getattr(self, key)}")
        if self.max_cases is not None and self.max_cases < 1:
            problems.append(f"llm.max_cases: must be at least 1, got {self.max_cases}")
        if not 0.0 < self.merge_threshold <= 1.0:
            problems.append(f"llm.merge_threshold: must be in (0, 1], got {self.merge_threshold}")
        if self.batch_tokens + self.max_tokens > self.tokens_per_minute:
            problems.append(f"llm.batch_tokens + llm.max_tokens ({self.batch_tokens + self.max_tokens}) must not "
                            f"exceed llm.tokens_per_minute ({self.tokens_per_minute}): no request could be sent")
        for model, pair in self.prices.items():
            if len(pair) != 2 or any(p < 0 for p in pair):
                problems.append(f"llm.prices.{model}: expected [usd_per_1k_prompt, usd_per_1k_completion], "
                                f"got {pair}")
        if self.export_batch and self.import_batch:
            problems.append("llm.export_batch and llm.import_batch: set at most one of them")
        for key in ("daf_template", "tcac_template", "merge_template", "validate_template", "import_batch"):
            value = getattr(self, key)
            if value is not None and not _is_remote(value) and not os.path.isfile(value):
                problems.append(f"llm.{key}: file not found: {value}")
        if problems:
            raise ConfigError("; ".join(problems))

    def price_table(self) -> dict[str, tuple[float, float]]:
        """``prices`` as the ``{model: (usd_per_1k_prompt, usd_per_1k_completion)}`` table the LLM layer takes."""
        return {model: (float(pair[0]), float(pair[1])) for model, pair in self.prices.items()}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class NameConfig:
    """The name stage: failure types named offline from the captions of the flagged pairs (caption contrast)."""

    max_types: int = 8
    """Write at most this many failure types (the strongest)."""
    min_z: float = 3.0
    """A term separates the flagged pairs when its log-odds z-score is at least this."""
    min_count: int = 3
    """... and it appears in at least this many flagged pairs."""
    ngram_max: int = 3
    """Terms are word n-grams of 1 to this many words."""
    background_pairs: int = 5000
    """Pairs of the corpus to contrast with (at least as many as there are flagged pairs): up to half of them
    pairs of reference-model neighbours, the rest seeded random pairs (every pair of a small corpus)."""
    alpha0: float = 100.0
    """Strength of the informative Dirichlet prior (pooled counts)."""
    evidence: int = 10
    """Evidence pairs kept per failure type."""
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("max_types", "min_count", "ngram_max", "background_pairs", "evidence"):
            if getattr(self, key) < 1:
                raise ConfigError(f"name.{key}: must be at least 1, got {getattr(self, key)}")
        if self.alpha0 <= 0:
            raise ConfigError(f"name.alpha0: must be positive, got {self.alpha0}")
        if self.min_z <= 0:
            raise ConfigError(f"name.min_z: must be positive (a term more frequent among the flagged pairs), got "
                              f"{self.min_z}")


@dataclass(frozen=True)
class ValidateConfig:
    """The validate stage: caption pairs per failure type, and when CLIP encodes a pair as near-identical."""

    pairs_per_type: int = 5
    """Caption pairs the LLM is asked to write for each failure type."""
    threshold: float = 0.9
    """absolute: a pair counts as near-identical when its CLIP text cosine similarity is at least this."""
    threshold_mode: Literal["absolute", "corpus_quantile"] = "absolute"
    """``corpus_quantile``: the threshold is the ``corpus_quantile`` of the cosine similarities of random pairs of
    corpus captions of different images (``caption_embeddings``), i.e. "as similar as the most similar 1 % of
    unrelated captions"; needs the embed stage's caption vectors from the same CLIP model."""
    corpus_quantile: float = 0.99
    corpus_pairs: int = 20_000
    """corpus_quantile: random caption pairs sampled (seeded)."""
    seed: int = 0
    max_types: int | None = None
    """Check at most this many failure types per method (by support); None: all."""

    def __post_init__(self) -> None:
        problems = []
        if self.pairs_per_type < 1 or self.corpus_pairs < 1:
            problems.append("validate.pairs_per_type and validate.corpus_pairs: must be at least 1")
        if not -1.0 <= self.threshold <= 1.0:
            problems.append(f"validate.threshold: must be a cosine similarity in [-1, 1], got {self.threshold}")
        if not 0.0 < self.corpus_quantile < 1.0:
            problems.append(f"validate.corpus_quantile: must be in (0, 1), got {self.corpus_quantile}")
        if self.max_types is not None and self.max_types < 1:
            problems.append(f"validate.max_types: must be at least 1, got {self.max_types}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class ReportConfig:
    """The report stage: how many cases the HTML report shows (the tables keep all of them) and thumbnail size."""

    daf_cases: int = 12
    """Most divergent DAF cases shown, each with its CLIP and reference neighbours."""
    blind_pairs: int = 12
    """CLIP-blind pairs shown (largest CLIP minus reference similarity first)."""
    tcac_cases: int = 4
    """Top TCAC cases shown per transform, original beside transformed."""
    top_captions: int = 5
    """Captions shown before and after a transform, of the ``tcac.top_k`` recorded."""
    examples_per_type: int = 6
    """Example thumbnails per failure type."""
    thumb_px: int = 96
    """Long side of a thumbnail, pixels."""
    jpeg_quality: int = 70
    workers: int = 8
    """Threads reading and shrinking images (object stores are slow to answer, not to send)."""

    def __post_init__(self) -> None:
        problems = [f"report.{key}: must be at least {low}, got {getattr(self, key)}"
                    for key, low in (("daf_cases", 0), ("blind_pairs", 0), ("tcac_cases", 0), ("top_captions", 1),
                                     ("examples_per_type", 0), ("thumb_px", 16), ("workers", 1))
                    if getattr(self, key) < low]
        if not 1 <= self.jpeg_quality <= 95:
            problems.append(f"report.jpeg_quality: must be in [1, 95], got {self.jpeg_quality}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    run_dir: str = "runs/demo"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    daf: DafConfig = field(default_factory=DafConfig)
    tcac: TcacConfig = field(default_factory=TcacConfig)
    name: NameConfig = field(default_factory=NameConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what is written beside the outputs)."""
        return dataclasses.asdict(self)

    def for_clip_model(self, spec: str) -> Config:
        """This configuration with ``models.clip`` set to ``spec`` alone: what a per-model stage runs with."""
        if spec not in self.models.clip_models:
            raise ConfigError(f"models.clip: {spec!r} is not one of the configured CLIP-role models "
                              f"({', '.join(self.models.clip_models)})")
        return dataclasses.replace(self, models=dataclasses.replace(self.models, clip=spec))


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate, and resolve relative paths.

    Relative paths in the file are taken relative to the file's folder; relative paths given in
    overrides, relative to the current directory. Raises :class:`ConfigError` naming the bad key or file.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
        raw = _resolve_paths(loaded or {}, config_path.parent.resolve())
    for item in overrides or []:
        _apply_override(raw, item, base)
    config = _build(Config, raw, "")
    _check_files(config)
    return config


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML (so ``3``, ``true``, ``[a, b]`` and ``null`` work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_PATH_KEYS = {("run_dir",), ("dataset", "captions"), ("dataset", "images"), ("dataset", "class_names"),
              ("models", "cache_dir")}
_PATH_KEYS |= {("llm", key) for key in ("daf_template", "tcac_template", "merge_template", "validate_template",
                                        "export_batch", "import_batch")}


def _is_remote(value: str) -> bool:
    return "://" in value


_PATH_OR_ID_KEYS = {("dataset", "path")}
"""Keys that hold a path (resolved against the config's folder when that exists) or a Hugging Face dataset id."""


def _path_or_id(value: str, base: Path) -> str:
    if _is_remote(value) or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    resolved = (base / os.path.expanduser(value)).resolve()
    return str(resolved) if resolved.exists() else value


def _precomputed_spec(spec: str, base: Path) -> str:
    """``precomputed:INDEX_DIR`` with a relative local INDEX_DIR made absolute against ``base`` (the config's
    folder, as every other path of a config file); any other spec unchanged."""
    prefix = "precomputed:"
    if not spec.startswith(prefix):
        return spec
    index = spec[len(prefix):]
    if not index or _is_remote(index) or os.path.isabs(os.path.expanduser(index)):
        return spec
    return prefix + str((base / os.path.expanduser(index)).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        value = dataset["path"]
        if dataset.get("format") == "clip_retrieval" and not _is_remote(value):
            dataset["path"] = str((base / os.path.expanduser(value)).resolve())
        else:
            dataset["path"] = _path_or_id(value, base)
    models = raw.get("models")
    if isinstance(models, dict) and isinstance(models.get("clip"), (str, list)):
        specs = models["clip"]
        resolved = [_precomputed_spec(s, base) if isinstance(s, str) else s
                    for s in (specs if isinstance(specs, list) else [specs])]
        models["clip"] = resolved if isinstance(specs, list) else resolved[0]
    for keys in _PATH_KEYS:
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            value = node[keys[-1]]
            if not _is_remote(value) and not os.path.isabs(os.path.expanduser(value)):
                node[keys[-1]] = str((base / value).resolve())
            else:
                node[keys[-1]] = os.path.expanduser(value)
    return raw


def _apply_override(raw: dict[str, Any], item: str, base: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    value = parse_value(text)
    if tuple(keys) in _PATH_KEYS and isinstance(value, str) and not _is_remote(value):
        value = str((base / os.path.expanduser(value)).resolve())
    elif tuple(keys) in _PATH_OR_ID_KEYS and isinstance(value, str):
        value = _path_or_id(value, base)
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known in {where}: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")


def _cached_hf_dataset(fmt: str, value: str) -> bool:
    """Whether ``value`` names a dataset repo (``ORG/NAME``) in the Hugging Face hub cache."""
    if fmt != "hf_dataset" or value.count("/") != 1 or value.startswith((".", "/")):
        return False
    from clipaudit.io.hf_cache import cached_snapshot

    return cached_snapshot(value) is not None


def _check_files(config: Config) -> None:
    """Missing inputs are errors before any work; positive sizes are required."""
    ds = config.dataset
    needs: dict[str, list[str]] = {
        "flickr8k": ["captions", "images"],
        "manifest": ["captions"],
        "imagefolder": ["images"],
        "webdataset": ["images"],
        "hf_dataset": ["path"],
        "clip_retrieval": ["path"],
        "synthetic": [],
    }
    for name in needs[ds.format]:
        value = getattr(ds, name)
        if value is None:
            raise ConfigError(f"dataset.{name} is required for format {ds.format}")
        if not _is_remote(value) and not os.path.exists(value) and not _cached_hf_dataset(ds.format, value):
            raise ConfigError(f"dataset.{name}: file not found: {value}"
                              + (" (nor a dataset of that id in the Hugging Face cache)"
                                 if ds.format == "hf_dataset" else ""))
    if ds.format in ("manifest", "clip_retrieval") and ds.images is not None and not _is_remote(ds.images) \
            and not os.path.isdir(ds.images):
        raise ConfigError(f"dataset.images: folder not found: {ds.images} ({ds.format}: the base folder of relative "
                          "image paths)")
    if ds.format == "clip_retrieval" and ds.path is not None and not _is_remote(ds.path) \
            and not os.path.isdir(os.path.join(ds.path, "metadata")):
        raise ConfigError(f"dataset.path: {ds.path} is not a clip-retrieval index folder (no metadata/ folder in "
                          "it: point it at the output folder of clip-retrieval inference)")
    if ds.class_names is not None and not os.path.exists(ds.class_names):
        raise ConfigError(f"dataset.class_names: file not found: {ds.class_names}")
    if not ds.caption_columns:
        raise ConfigError("dataset.caption_columns: at least one column is required")
    for key, value in [("embed.batch_size", config.embed.batch_size),
                       ("embed.text_batch_size", config.embed.text_batch_size),
                       ("embed.actors_per_model", config.embed.actors_per_model),
                       ("embed.max_pixels", config.embed.max_pixels),
                       ("embed.write_every", config.embed.write_every),
                       ("dataset.num_images", config.dataset.num_images),
                       ("neighbours.k", config.neighbours.k)]:
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0 <= config.embed.max_reject_share <= 1:
        raise ConfigError(f"embed.max_reject_share: must be between 0 and 1, got {config.embed.max_reject_share}")
    if config.embed.cpus_per_actor is not None and config.embed.cpus_per_actor <= 0:
        raise ConfigError(f"embed.cpus_per_actor: must be positive, got {config.embed.cpus_per_actor}")
    if config.dataset.variants < 0:
        raise ConfigError(f"dataset.variants: must be 0 or more, got {config.dataset.variants}")
    if config.dataset.limit is not None and config.dataset.limit <= 0:
        raise ConfigError(f"dataset.limit: must be positive, got {config.dataset.limit}")
