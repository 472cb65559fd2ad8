"""What the audit computes and reports: DAF (``daf``), TCAC (``tcac``), the namers (``name``, ``llm``), validation
(``validate``) and the report (``report``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from clipaudit.config.errors import ConfigError
from clipaudit.transforms import CORRUPTION_NAMES, LEVELS, TRANSFORM_NAMES, TransformParams, expand, parse_graded


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
            if value is not None and "://" not in value and not os.path.isfile(value):
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
