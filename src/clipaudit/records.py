"""The records that flow between stages and the Arrow schemas of the tables that hold them.

The table names and key columns are the contract between stages (see DESIGN.md); more columns are welcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

SAMPLES = "samples"
REJECTS = "rejects"
IMAGE_EMBEDDINGS = {"clip": "image_embeddings_clip", "reference": "image_embeddings_reference"}
CAPTION_EMBEDDINGS = "caption_embeddings"


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


def image_embeddings_schema(dim: int) -> pa.Schema:
    """Schema of ``image_embeddings_clip`` / ``image_embeddings_reference``: one L2-normalised vector per image."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


def caption_embeddings_schema(dim: int) -> pa.Schema:
    """Schema of ``caption_embeddings``: one CLIP text vector per caption (``caption_id`` = ``image_id#n``)."""
    return pa.schema([
        pa.field("caption_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim)),
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
