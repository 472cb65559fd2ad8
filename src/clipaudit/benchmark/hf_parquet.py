"""The benchmark's tables as Hugging Face ``datasets`` Parquet files (``hf/pairs.parquet``, ``hf/invariance.parquet``).

``datasets.load_dataset("parquet", data_files=...)`` reads these files as they are and decodes their image columns
to PIL images. The layout is the one ``datasets`` itself writes for an ``Image()`` feature:

- each image column (``image_a`` and ``image_b`` of the pairs, ``image`` of the invariance probes) is an Arrow
  ``struct<bytes: binary, path: string>``: with ``--images copy`` ``bytes`` holds the image file's bytes (as read
  for ``images/``) and ``path`` its path inside the benchmark folder (``images/...``); with ``--images reference``
  ``bytes`` is null and ``path`` is the image's URI;
- the Arrow schema's metadata has the key ``huggingface``, whose JSON value ``{"info": {"features": {...}}}`` names
  every column's ``datasets`` feature (``{"_type": "Image"}`` for the image columns, ``Value``/``List`` for the
  others): that is what makes ``datasets`` decode the structs as images instead of plain dicts.

The other columns are those of ``pairs.parquet`` / ``invariance.parquet`` (the image ids as ``image_id_a`` /
``image_id_b`` / ``image_id``), plus ``license`` and ``attribution``. Their values, per image: the run's
``samples`` table columns ``license`` / ``attribution`` where the table has them and the value is not null, else
the export's ``--license`` / ``--attribution``, else, for a run of the ``flickr8k`` format,
:data:`FLICKR8K_LICENSE` / :data:`FLICKR8K_ATTRIBUTION`, else null. A pair whose two images carry different
values gets ``image_a: A | image_b: B`` (``unknown`` for a null side).

Rows keep the export's order (sorted), row groups hold :data:`ROW_GROUP_SIZE` rows (``datasets``' own size for
image tables) and the files are written with :func:`clipaudit.benchmark.format.parquet_bytes`, so the same run gives
the same bytes. Nothing here imports ``datasets``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.benchmark.format import INVARIANCE_SCHEMA, PAIRS_SCHEMA, parquet_bytes
from clipaudit.records import SAMPLES

if TYPE_CHECKING:
    from clipaudit.run_view import RunView

HF_METADATA_KEY = b"huggingface"
"""The Arrow schema metadata key ``datasets`` reads its features from."""

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""The Arrow type of a ``datasets.Image()`` column."""

ROW_GROUP_SIZE = 100
"""Rows per Parquet row group (``datasets.config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS``)."""

LICENSE_COLUMNS = ("license", "attribution")
"""The ``samples`` columns read for per-image values, and the columns written."""

FLICKR8K_LICENSE = ("Flickr8k: research use only (Hodosh, Young and Hockenmaier, JAIR 2013); photos © their Flickr "
                    "authors")
"""The ``license`` of a Flickr8k run's images when neither the samples table nor ``--license`` gives one."""

FLICKR8K_ATTRIBUTION = "Hodosh, Young and Hockenmaier, JAIR 2013; photos © their Flickr authors"
"""The ``attribution`` of a Flickr8k run's images when neither the samples table nor ``--attribution`` gives one."""

_LICENSE_FIELDS = [pa.field("license", pa.string()), pa.field("attribution", pa.string())]

HF_PAIRS_SCHEMA = pa.schema([
    pa.field("image_a", IMAGE_TYPE),
    pa.field("image_b", IMAGE_TYPE),
    *(f.with_name({"image_a": "image_id_a", "image_b": "image_id_b"}.get(f.name, f.name)).with_nullable(True)
      for f in PAIRS_SCHEMA if f.name not in ("file_a", "file_b")),
    *_LICENSE_FIELDS,
])
"""``hf/pairs.parquet`` (without its ``huggingface`` metadata: see :func:`with_features`): the rows of
``pairs.parquet``, the images inline."""

HF_INVARIANCE_SCHEMA = pa.schema([
    pa.field("image", IMAGE_TYPE),
    *(f.with_nullable(True) for f in INVARIANCE_SCHEMA if f.name != "file"),
    *_LICENSE_FIELDS,
])
"""``hf/invariance.parquet`` (without its ``huggingface`` metadata): the rows of ``invariance.parquet``, the
image inline."""

_VALUE_DTYPES = {pa.string(): "string", pa.bool_(): "bool", pa.float32(): "float32", pa.float64(): "float64",
                 pa.int32(): "int32", pa.int64(): "int64", pa.binary(): "binary"}

ImageBytes = Callable[[str, str], "bytes | None"]
"""``(image_id, file) -> bytes`` of an image, or None where the export references images by URI."""


def feature(arrow_type: pa.DataType) -> dict[str, Any]:
    """The ``datasets`` feature (as its JSON) of a column of ``arrow_type``: ``Image`` for :data:`IMAGE_TYPE`,
    ``List`` for a list, else ``Value``; ValueError for a type this module does not write."""
    if arrow_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        return {"feature": feature(arrow_type.value_type), "_type": "List"}
    if arrow_type in _VALUE_DTYPES:
        return {"dtype": _VALUE_DTYPES[arrow_type], "_type": "Value"}
    raise ValueError(f"no datasets feature for Arrow type {arrow_type}")


def with_features(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata ``datasets`` writes: ``{"info": {"features": {...}}}``."""
    features = {f.name: feature(f.type) for f in schema}
    return schema.with_metadata({HF_METADATA_KEY: json.dumps({"info": {"features": features}}).encode("utf-8")})


@dataclass
class Licences:
    """The ``license`` / ``attribution`` of each image: ``per_image`` (from the samples table) over the dataset-wide
    ``license`` / ``attribution`` (the CLI's, or a source corpus default)."""

    license: str | None = None
    attribution: str | None = None
    per_image: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def of(self, image_id: str) -> tuple[str | None, str | None]:
        """``(license, attribution)`` of one image."""
        own = self.per_image.get(image_id, (None, None))
        return (own[0] if own[0] is not None else self.license,
                own[1] if own[1] is not None else self.attribution)

    def per_image_columns(self) -> list[str]:
        """The columns (of :data:`LICENSE_COLUMNS`) for which some image has a value of its own."""
        return [name for index, name in enumerate(LICENSE_COLUMNS)
                if any(values[index] is not None for values in self.per_image.values())]

    def manifest(self) -> dict[str, Any]:
        """The ``license`` entry of ``benchmark.json``: the dataset-wide values and which columns vary per image."""
        return {"license": self.license, "attribution": self.attribution, "per_image": self.per_image_columns()}

    def of_pair(self, image_a: str, image_b: str) -> tuple[str | None, str | None]:
        """``(license, attribution)`` of a pair: the images' value where they agree, else both, labelled."""
        (license_a, attribution_a), (license_b, attribution_b) = self.of(image_a), self.of(image_b)
        return _merge(license_a, license_b), _merge(attribution_a, attribution_b)


def _merge(a: str | None, b: str | None) -> str | None:
    return a if a == b else f"image_a: {a or 'unknown'} | image_b: {b or 'unknown'}"


def read_licences(view: RunView, image_ids: Iterable[str], license: str | None = None,
                  attribution: str | None = None, dataset_format: str | None = None) -> Licences:
    """The licences of the images ``image_ids`` of the run ``view``: the samples table's ``license`` /
    ``attribution`` columns where it has them, over ``license`` / ``attribution`` (the export's options), over the
    Flickr8k default when ``dataset_format`` is ``flickr8k``."""
    if dataset_format == "flickr8k":
        license = FLICKR8K_LICENSE if license is None else license
        attribution = FLICKR8K_ATTRIBUTION if attribution is None else attribution
    has_column = getattr(view.tables, "has_column", None)
    columns = [c for c in LICENSE_COLUMNS if has_column is not None and has_column(SAMPLES, c)]
    per_image: dict[str, tuple[str | None, str | None]] = {}
    if columns:
        for image_id, row in view.samples(image_ids, columns).items():
            license_value, attribution_value = (row.get(c) for c in LICENSE_COLUMNS)
            per_image[image_id] = (None if license_value is None else str(license_value),
                                   None if attribution_value is None else str(attribution_value))
    return Licences(license, attribution, per_image)


def _image(image_id: str, file: str | None, image_bytes: ImageBytes) -> dict[str, Any]:
    return {"bytes": image_bytes(image_id, file) if file is not None else None, "path": file}


def pairs_table(rows: Sequence[dict[str, Any]], image_bytes: ImageBytes, licences: Licences) -> pa.Table:
    """``hf/pairs.parquet``'s table from the export's pair rows (:data:`~clipaudit.benchmark.format.PAIRS_SCHEMA`
    columns, in their order); ``image_bytes(image_id, file)`` gives each image's bytes (None: reference)."""
    out = []
    for row in rows:
        license, attribution = licences.of_pair(row["image_a"], row["image_b"])
        out.append({"image_a": _image(row["image_a"], row["file_a"], image_bytes),
                    "image_b": _image(row["image_b"], row["file_b"], image_bytes),
                    "image_id_a": row["image_a"], "image_id_b": row["image_b"],
                    **{name: row[name] for name in HF_PAIRS_SCHEMA.names
                       if name not in ("image_a", "image_b", "image_id_a", "image_id_b", *LICENSE_COLUMNS)},
                    "license": license, "attribution": attribution})
    return pa.Table.from_pylist(out, schema=with_features(HF_PAIRS_SCHEMA))


def invariance_table(rows: Sequence[dict[str, Any]], image_bytes: ImageBytes, licences: Licences) -> pa.Table:
    """``hf/invariance.parquet``'s table from the export's probe rows
    (:data:`~clipaudit.benchmark.format.INVARIANCE_SCHEMA` columns, in their order)."""
    out = []
    for row in rows:
        license, attribution = licences.of(row["image_id"])
        out.append({"image": _image(row["image_id"], row["file"], image_bytes),
                    **{name: row[name] for name in HF_INVARIANCE_SCHEMA.names
                       if name not in ("image", *LICENSE_COLUMNS)},
                    "license": license, "attribution": attribution})
    return pa.Table.from_pylist(out, schema=with_features(HF_INVARIANCE_SCHEMA))


def hf_parquet_bytes(table: pa.Table) -> bytes:
    """A table of this module as Parquet bytes (fixed options, :data:`ROW_GROUP_SIZE` rows per row group)."""
    return parquet_bytes(table, row_group_size=ROW_GROUP_SIZE)
