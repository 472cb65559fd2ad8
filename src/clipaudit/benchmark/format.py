"""The benchmark folder's format: its version, file names, table schemas, and deterministic reading and writing.

A benchmark folder holds ``benchmark.json`` (the format version, provenance and counts), ``pairs.parquet``,
``invariance.parquet``, ``text_pairs.parquet``, ``README.md`` (the dataset card), ``hf/pairs.parquet`` and
``hf/invariance.parquet`` (the same rows for Hugging Face ``datasets``, images inline:
:mod:`clipaudit.benchmark.hf_parquet`) and, when exported with ``--images copy``, ``images/``. Every file is
written from sorted rows with fixed options and no timestamps, so the same run exports to the same bytes.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.errors import ClipauditError
from clipaudit.io import fs

FORMAT_VERSION = 1
"""The benchmark format this version of clipaudit writes and the newest one it reads."""

MANIFEST = "benchmark.json"
PAIRS = "pairs.parquet"
INVARIANCE = "invariance.parquet"
TEXT_PAIRS = "text_pairs.parquet"
CARD = "README.md"
IMAGES_DIR = "images"
HF_DIR = "hf"
HF_PAIRS = f"{HF_DIR}/pairs.parquet"
HF_INVARIANCE = f"{HF_DIR}/invariance.parquet"
IMAGE_MODES = ("copy", "reference")

PAIRS_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("image_a", pa.string(), nullable=False),
    pa.field("image_b", pa.string(), nullable=False),
    pa.field("file_a", pa.string()),
    pa.field("file_b", pa.string()),
    pa.field("caption_a", pa.string()),
    pa.field("caption_b", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("blind_pair", pa.bool_()),
    pa.field("daf_case", pa.bool_()),
    pa.field("clip_sim", pa.float32()),
    pa.field("reference_sim", pa.float32()),
    pa.field("llm_caption_a", pa.string()),
    pa.field("llm_caption_b", pa.string()),
])
"""``pairs.parquet``: one row per unordered image pair the audited CLIP confuses (``image_a < image_b``).
``file_*`` is the image's path inside the folder (``images/...``) or its URI; ``caption_*`` the image's own caption;
``kind`` ``blind_pair`` (a CLIP-blind pair) or ``daf_case`` (a DAF case and one of its CLIP-only neighbours);
``clip_sim`` / ``reference_sim`` the two models' cosine similarity in the audit; ``llm_caption_*`` the LLM's
distinguishing captions (null where the LLM was not asked)."""

INVARIANCE_SCHEMA = pa.schema([
    pa.field("probe_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("file", pa.string()),
    pa.field("transform", pa.string(), nullable=False),
    pa.field("params", pa.string()),
    pa.field("settings", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("pool", pa.list_(pa.string())),
    pa.field("audited_rank_before", pa.int32()),
    pa.field("audited_rank_after", pa.int32()),
])
"""``invariance.parquet``: one row per TCAC probe (an image and a transform that moved the audited CLIP's
captions). ``params`` the drawn parameters and ``settings`` the configured ones (JSON, as in ``tcac_cases``), from
which :func:`clipaudit.transforms.apply_params` re-creates the transformed image; ``caption`` the image's own
caption; ``pool`` the captions the ranks are taken in (``caption`` among them); ``audited_rank_*`` its 1-based
rank under the audited CLIP before and after."""

TEXT_PAIRS_SCHEMA = pa.schema([
    pa.field("failure_type", pa.string(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("description", pa.string()),
    pa.field("caption_a", pa.string(), nullable=False),
    pa.field("caption_b", pa.string(), nullable=False),
    pa.field("threshold", pa.float64()),
    pa.field("audited_sim", pa.float32()),
])
"""``text_pairs.parquet``: the validated caption pairs of each failure type (MultiMon style): two captions of
visibly different images; ``threshold`` the near-identical cosine threshold recorded with the type;
``audited_sim`` the audited CLIP text tower's similarity of the pair."""


class BenchmarkError(ClipauditError, RuntimeError):
    """A benchmark cannot be exported or read (the message says why and what to do)."""


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """``table`` as Parquet bytes, written with fixed options (the same table gives the same bytes);
    ``row_group_size``: rows per row group (None: pyarrow's default)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", write_statistics=False, store_schema=True,
                   row_group_size=row_group_size)
    return buffer.getvalue()


def json_text(value: Any) -> str:
    """Canonical JSON text (sorted keys, two-space indent, a final newline)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(bench_dir: str) -> dict[str, Any]:
    """``benchmark.json`` of a benchmark folder, its format version checked.

    Raises :class:`BenchmarkError` when the folder is not a benchmark or was written in a newer format.
    """
    path = fs.join(bench_dir, MANIFEST)
    if not fs.exists(path):
        raise BenchmarkError(f"{bench_dir}: not a clipaudit benchmark folder (no {MANIFEST}); make one with "
                             "`clipaudit export RUN_DIR OUT_DIR`")
    try:
        manifest = json.loads(fs.read_text(path))
        version = int(manifest["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchmarkError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if version > FORMAT_VERSION:
        raise BenchmarkError(f"{bench_dir}: benchmark format version {version} is newer than this clipaudit reads "
                             f"(up to {FORMAT_VERSION}): upgrade clipaudit to score it")
    return manifest


def read_table(bench_dir: str, name: str, schema: pa.Schema) -> pa.Table:
    """A table of a benchmark folder (empty when the file is absent), with the columns of ``schema``."""
    path = fs.join(bench_dir, name)
    if not fs.exists(path):
        return schema.empty_table()
    table = pq.read_table(io.BytesIO(fs.read_bytes(path)))
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise BenchmarkError(f"{path}: missing columns {', '.join(missing)}")
    return table.select(schema.names)


def resolve_file(bench_dir: str, file: str) -> str:
    """Where an image named in a table is read from: a path inside the folder, or the URI as it is."""
    return fs.join(bench_dir, *file.split("/")) if file.startswith(f"{IMAGES_DIR}/") else file
