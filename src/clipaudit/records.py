"""The records that flow between stages and the Arrow schemas of the tables that hold them.

The table names and key columns are the contract between stages (see DESIGN.md); more columns are welcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

SAMPLES = "samples"
REJECTS = "rejects"
IMAGE_EMBEDDINGS = {"clip": "image_embeddings_clip", "reference": "image_embeddings_reference"}
CAPTION_EMBEDDINGS = "caption_embeddings"
CLIP_MODEL = "clip_model"
"""The column that tells the CLIP-role models of one run apart: the spec as written in ``models.clip``."""
OK = "ok"
"""The ``status`` of a batch row that went through (any other value is a reject reason)."""
REFERENCE_MODEL = "reference_model"
"""The column that tells the reference models of one run apart: the spec as written in ``models.reference``."""


@dataclass(frozen=True)
class Sample:
    """One captioned image of the corpus.

    ``image_id`` is stable across runs (derived from the source, never from read order); ``uri`` is
    what :func:`clipaudit.io.fs.read_bytes` reads (a path, a URL, or ``shard.tar::member``).
    """

    image_id: str
    uri: str
    captions: list[str]
    caption: str
    source: str
    label: str | None = None


@dataclass(frozen=True)
class Reject:
    """An input that did not make it, and why: failures are data.

    ``source`` is the file it came from, ``item`` the line, key or image id inside it, ``stage`` the
    stage that rejected it, ``reason`` a short code (``malformed``, ``missing_image``, ``duplicate``,
    ``undecodable``, ...) and ``detail`` a human-readable message.
    """

    source: str
    item: str
    stage: str
    reason: str
    detail: str = ""


SAMPLES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption", pa.string()),
    pa.field("source", pa.string()),
    pa.field("label", pa.string()),
])

REJECTS_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("item", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])
REJECTS_KEY = ["stage", "source", "item"]
WORKER_LOST = "worker_lost"
"""Reject reason of a row whose worker died every time it was run, alone, in one run: transient until shown
otherwise (a node may have gone with it), so the next run of the run_dir tries the row again."""
KILLS_WORKER = "kills_worker"
"""Reject reason of a row that was :data:`WORKER_LOST` in an earlier run and lost again, alone, when retried: it
fails deterministically and stays rejected."""
RETRYABLE_REASONS = frozenset({WORKER_LOST})
"""Reject reasons of a transient kind: their rows are tried again by the next run of the same run_dir. Every
other reason is final (the row fails alone, deterministically: unreadable, undecodable, a forward that raises)."""


def vector_type(dim: int | None) -> pa.DataType:
    """A vector column: fixed-size ``dim`` floats, or variable-size (None) where one table holds the vectors of
    several CLIP-role models, whose dimensions may differ (each model's own rows have one dimension)."""
    return pa.list_(pa.float32()) if dim is None else pa.list_(pa.float32(), dim)


def vector_array(vectors: np.ndarray) -> pa.Array:
    """An ``(n, d)`` float32 array as a variable-size vector column (:func:`vector_type` None)."""
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    n, dim = vectors.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, max(dim, 1), dtype=np.int32)[:n + 1]), values)


def image_embeddings_schema(dim: int | None) -> pa.Schema:
    """Schema of ``image_embeddings_clip`` (``dim`` None: variable-size vectors, one dimension per CLIP-role model)
    / ``image_embeddings_reference`` (fixed ``dim``): one L2-normalised vector per image."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", vector_type(dim)),
    ])


def caption_embeddings_schema(dim: int | None) -> pa.Schema:
    """Schema of ``caption_embeddings``: one CLIP text vector per caption (``caption_id`` = ``image_id#n``); ``dim``
    None: variable-size vectors (the table holds every CLIP-role model's)."""
    return pa.schema([
        pa.field("caption_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", vector_type(dim)),
    ])


def samples_to_table(samples: list[Sample]) -> pa.Table:
    """Arrow table of samples in the ``samples`` schema."""
    return pa.Table.from_pylist([s.__dict__ for s in samples], schema=SAMPLES_SCHEMA)


def rejects_to_table(rejects: list[Reject]) -> pa.Table:
    """Arrow table of rejects in the ``rejects`` schema."""
    return pa.Table.from_pylist([r.__dict__ for r in rejects], schema=REJECTS_SCHEMA)


@dataclass
class StageStats:
    """Counts and per-phase seconds of one stage run, written to ``run_dir/stats/<stage>.json``."""

    stage: str
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        """Accumulate wall or worker seconds spent in ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    def add_count(self, name: str, n: int = 1) -> None:
        """Accumulate a count."""
        self.counts[name] = self.counts.get(name, 0) + int(n)


TCAC_CASES = "tcac_cases"
TCAC_SUMMARY = "tcac_summary"
TCAC_CASES_KEY = ["image_id", "transform"]

TCAC_CASES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("transform", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("params", pa.string()),
    pa.field("settings", pa.string()),
    pa.field("pool_size", pa.int32()),
    pa.field("top_before", pa.list_(pa.string())),
    pa.field("probs_before", pa.list_(pa.float32())),
    pa.field("top_after", pa.list_(pa.string())),
    pa.field("probs_after", pa.list_(pa.float32())),
    pa.field("changed", pa.int32()),
    pa.field("top1_changed", pa.bool_()),
    pa.field("gt_caption", pa.string()),
    pa.field("gt_rank_before", pa.int32()),
    pa.field("gt_rank_after", pa.int32()),
    pa.field("gt_prob_before", pa.float32()),
    pa.field("gt_prob_after", pa.float32()),
    pa.field("tv_distance", pa.float32()),
    pa.field("rank", pa.int32()),
    pa.field("is_case", pa.bool_()),
    pa.field("daf_case", pa.bool_()),
])
"""``tcac_cases``: one row per (image, transform). ``params`` is the JSON of the parameters drawn, ``settings``
the JSON of the configured ones and the seed; ``top_*`` / ``probs_*`` the top captions of the image's pool and
their CLIP probabilities before and after; ``changed`` how many of the top captions differ; ``gt_rank_*`` the
1-based rank of the sample's chosen caption; ``rank`` the place in the paper's order within the transform
(changed descending, then total variation descending, then image_id); ``is_case`` the first
``tcac.cases_per_transform`` of them; ``daf_case`` whether the image is in ``daf_cases``."""

TCAC_SUMMARY_SCHEMA = pa.schema([
    pa.field("transform", pa.string(), nullable=False),
    pa.field("model", pa.string()),
    pa.field("images", pa.int64()),
    pa.field("mean_changed", pa.float64()),
    pa.field("top1_changed_share", pa.float64()),
    pa.field("recall_at_1_before", pa.float64()),
    pa.field("recall_at_5_before", pa.float64()),
    pa.field("recall_at_10_before", pa.float64()),
    pa.field("recall_at_1_after", pa.float64()),
    pa.field("recall_at_5_after", pa.float64()),
    pa.field("recall_at_10_after", pa.float64()),
    pa.field("mean_tv_distance", pa.float64()),
    pa.field("cases", pa.int64()),
    pa.field("daf_cases", pa.int64()),
])
"""``tcac_summary``: one row per transform. ``recall_at_k_*`` is the share of images whose chosen caption ranks
in the top k of its pool; ``daf_cases`` counts the cases whose image is also a DAF case."""


NEIGHBOURS = "neighbours"
NEIGHBOURS_KEY = ["image_id", "model", "clip_model", "reference_model"]
NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("ids", pa.list_(pa.string())),
    pa.field("sims", pa.list_(pa.float32())),
    pa.field("k", pa.int32()),
    pa.field("method", pa.string()),
    pa.field("spec", pa.string()),
])
"""``neighbours``: one row per (image, role). ``model`` is the role (``clip`` or ``reference``), ``ids`` the
image's top-``k`` neighbours by cosine similarity (itself excluded), ``sims`` their similarities, both
similarity descending with ties by image_id; ``method`` ``exact`` or ``ann``; ``spec`` the model spec. As stored,
rows also carry ``clip_model`` (the CLIP-role model of a ``clip`` row; empty on ``reference`` rows, which every
CLIP model shares) and ``reference_model`` (the reference of a ``reference`` row; empty on ``clip`` rows): the key is
(image_id, model, clip_model, reference_model) (:data:`NEIGHBOURS_STORED_SCHEMA`)."""

NEIGHBOURS_ANN = {"clip": "neighbours_ann_clip", "reference": "neighbours_ann_reference"}
"""Scratch tables holding the vectors and the LanceDB vector index of ``neighbours.method: ann``."""

DAF_CASES = "daf_cases"
BLIND_PAIRS = "blind_pairs"

DAF_CASES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("overlap", pa.float32()),
    pa.field("score", pa.float32()),
    pa.field("rbo", pa.float32()),
    pa.field("z", pa.float32()),
    pa.field("p_value", pa.float32()),
    pa.field("rank", pa.int32()),
    pa.field("clip_only", pa.list_(pa.string())),
    pa.field("reference_only", pa.list_(pa.string())),
    pa.field("clip_ids", pa.list_(pa.string())),
    pa.field("reference_ids", pa.list_(pa.string())),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption", pa.string()),
    pa.field("references", pa.list_(pa.string())),
    pa.field("reference_overlaps", pa.list_(pa.float32())),
])
"""``daf_cases``: the selected DAF failure cases, one row per image. ``overlap`` = |CLIP top-k & reference
top-k| / k; ``rbo`` the rank-biased overlap of the two lists; ``score`` = 1 - rbo (divergence, higher is more
divergent); ``z`` the image's overlap as a standard score over the corpus; ``p_value`` the chance that two
unrelated neighbour lists of this corpus (permutation null) share at least as many neighbours; ``rank`` 1 = most
divergent; ``clip_only`` / ``reference_only`` the neighbours in one list only, in that model's rank order;
``clip_ids`` / ``reference_ids`` the full lists; ``captions`` the image's caption then those of its
``clip_only`` neighbours; ``caption`` the image's own caption; ``references`` the reference models that disagree
with CLIP on the image and ``reference_overlaps`` its overlap with each reference (config order). With several
references the figures are the least divergent reference's (``daf.consensus: all``) or the most divergent's
(``any``), and ``reference_only`` / ``reference_ids`` are the first reference's."""

BLIND_PAIRS_SCHEMA = pa.schema([
    pa.field("image_a", pa.string(), nullable=False),
    pa.field("image_b", pa.string(), nullable=False),
    pa.field("clip_sim", pa.float32()),
    pa.field("reference_sim", pa.float32()),
    pa.field("gap", pa.float32()),
    pa.field("rule", pa.string()),
    pa.field("references", pa.list_(pa.string())),
])
"""``blind_pairs``: CLIP-blind pairs (MMVP): CLIP neighbour pairs that CLIP finds near-identical and the
reference finds different; unordered (``image_a < image_b``) and deduplicated; ``reference_sim`` computed
exactly from the reference vectors; ``gap`` = clip_sim - reference_sim; ``rule`` ``absolute`` or ``quantile``;
``references`` the reference models that find the pair different. With several references ``reference_sim`` is
the highest of theirs (``daf.consensus: all``: every reference must find the pair different) or the lowest
(``any``)."""

LLM_CALLS = "llm_calls"
LLM_CALLS_KEY = "request_id"
LLM_CALLS_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("prompt_hash", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("method", pa.string()),
    pa.field("model", pa.string()),
    pa.field("status", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("tokens", pa.int64()),
    pa.field("cost", pa.float64()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_s", pa.float64()),
    pa.field("response", pa.string()),
    pa.field("error", pa.string()),
    pa.field("request", pa.string()),
    pa.field("meta", pa.string()),
    pa.field("source", pa.string()),
    pa.field("updated_at", pa.string()),
])
"""``llm_calls``: one row per LLM request, keyed by ``request_id`` (a hash of model, messages and parameters), the
latest outcome kept: ``status`` ``ok`` / ``failed`` / ``parse_failed``. A re-run sends only the requests without an
``ok`` row. ``kind`` is ``summarize``, ``merge`` or ``validate``; ``method`` ``DAF`` / ``TCAC`` (empty for
validate); ``tokens`` = prompt + completion as the server reported them; ``cost`` USD from ``llm.prices`` (null for
an unpriced model); ``response`` the answer text; ``error`` why it failed (secrets scrubbed); ``request`` the JSON
of model, messages and parameters (never the key); ``meta`` the JSON of what the request covers (case ids, image
ids, transform, failure type); ``source`` ``live`` or ``batch`` (imported from an OpenAI Batch API output file)."""

FAILURE_TYPES = "failure_types"
FAILURE_TYPES_KEY = ["namer", "method", "name"]
NAMERS = ("caption_contrast", "llm")
FAILURE_TYPES_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("description", pa.string()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("support", pa.int64()),
    pa.field("batches", pa.int64()),
    pa.field("example_ids", pa.list_(pa.string())),
    pa.field("aliases", pa.list_(pa.string())),
    pa.field("rank", pa.int32()),
    pa.field("merge", pa.string()),
    pa.field("model", pa.string()),
    pa.field("request_ids", pa.list_(pa.string())),
    pa.field("namer", pa.string()),
    pa.field("terms", pa.list_(pa.string())),
    pa.field("evidence_pairs", pa.list_(pa.string())),
])
"""``failure_types``: one row per (namer, method, failure type). ``namer`` ``caption_contrast`` (the name stage,
offline: :mod:`clipaudit.caption_contrast`) or ``llm`` (the summarize stage); each namer replaces only its own
rows. ``terms`` (caption contrast) the separating n-grams, strongest first; ``evidence_pairs`` the flagged pairs
that show the type, as ``"image_a|image_b"``. For the LLM's rows: ``method`` ``DAF`` or ``TCAC``;
``support`` the number of distinct cases in the prompts whose answer named the type (or a near-duplicate of it);
``batches`` how many answers named it; ``example_ids`` up to ``llm.max_examples`` image ids of those cases, in
case rank order; ``aliases`` every name merged into it; ``rank`` 1 = most supported within the method; ``merge``
``text`` or ``llm``; ``request_ids`` the ``llm_calls`` rows it came from. For caption contrast: ``method`` ``DAF``,
``support`` the flagged pairs holding one of its terms, ``model`` ``caption_contrast``. Recomputed and replaced on
every run (a table written before there were two namers is read as the LLM's)."""

FAILURE_CHECKS = "failure_checks"
FAILURE_CHECKS_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("description", pa.string()),
    pa.field("pairs", pa.string()),
    pa.field("n_pairs", pa.int32()),
    pa.field("sims", pa.list_(pa.float32())),
    pa.field("success_rate", pa.float64()),
    pa.field("mean_sim", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("threshold_mode", pa.string()),
    pa.field("model", pa.string()),
    pa.field("request_id", pa.string()),
    pa.field("status", pa.string()),
])
"""``failure_checks``: one row per failure type checked. ``pairs`` the JSON list of ``[a, b]`` caption pairs the LLM
wrote to exhibit the type (two captions of visibly different images); ``sims`` their cosine similarities under the
CLIP text tower (``model``); ``success_rate`` the share of pairs with similarity >= ``threshold`` (CLIP cannot tell
them apart; null without pairs); ``threshold_mode`` ``absolute`` or ``corpus_quantile``; ``status`` the status of
the request (``ok``, ``failed``, ``parse_failed``, ``pending`` when not sent). Recomputed and replaced every run."""


LEADERBOARD = "leaderboard"
LEADERBOARD_KEY = CLIP_MODEL

CLIP_SCOPED = frozenset({IMAGE_EMBEDDINGS["clip"], CAPTION_EMBEDDINGS, NEIGHBOURS, DAF_CASES, BLIND_PAIRS, TCAC_CASES,
                         TCAC_SUMMARY, FAILURE_TYPES, FAILURE_CHECKS})
"""The tables of CLIP-role results: each has a ``clip_model`` column, part of its key, so the rows of several
CLIP-role models live side by side (see :class:`clipaudit.io.tables.ModelTables`). A row shared by every model
(the reference role's neighbour lists) has an empty ``clip_model``."""


def with_clip_model(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``clip_model`` column appended (as a CLIP-scoped table stores it)."""
    return schema if CLIP_MODEL in schema.names else schema.append(pa.field(CLIP_MODEL, pa.string(), nullable=False))


NEIGHBOURS_STORED_SCHEMA = with_clip_model(NEIGHBOURS_SCHEMA).append(
    pa.field(REFERENCE_MODEL, pa.string(), nullable=False))
"""``neighbours`` as the neighbours stage writes it: :data:`NEIGHBOURS_SCHEMA` plus ``clip_model`` and
``reference_model``."""
