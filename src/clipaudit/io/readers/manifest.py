"""A generic manifest: CSV / TSV / JSONL / JSON / Parquet, one row per image (the kind from the extension).

``dataset.image_column`` holds an image path (relative to ``dataset.images`` when it is set, else to the
manifest's folder; or absolute) or a URL;
``dataset.caption_columns`` one or more caption columns, each cell a string or a list of strings (in CSV
also a JSON-encoded list such as ``["a dog", "a brown dog"]``); ``dataset.id_column`` optionally the id.

A configured column that the file does not have is an :class:`IngestError` naming the file and the column
(CSV and TSV: the header; Parquet: the schema; JSONL and JSON: the first record). A bad row is a reject with
its place in the file (``line N`` for CSV and JSONL, ``item N`` for a JSON array, ``row N`` for Parquet):
``malformed`` (unparsable line, not an object, empty image cell, a caption cell of the wrong type),
``no_caption``, or ``missing_image`` (a local image path that does not exist; URLs are not checked here).

``image_id``, unless an id column is set: for a path, the path as written relative to the base folder,
normalised, with ``/`` separators and the extension kept (``imgs/cat.jpg``; an absolute path stays
absolute): stable, unique per file, and readable; for a URL (any ``scheme://``), ``url-`` and the first 16
hex digits of its SHA-256 (a URL can be long and hold characters unfit for ids; 64 bits make a collision
negligible).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs
from clipaudit.io.readers.common import (
    IngestError,
    absolute,
    clip_text,
    csv_records,
    dirname,
    line_span,
    log,
    numbered_lines,
    open_binary,
    progress,
    reject,
    require,
    undecodable,
)
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig

_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
          ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class _Row:
    """One record of the manifest and where it is (``line 3``, ``row 3``...)."""

    item: str
    values: dict[str, Any]
    from_text: bool


class BadCell(ValueError):
    """A cell that holds something other than what its column needs."""


def read_manifest(cfg: DatasetConfig) -> Iterator[Sample | Reject]:
    """Samples and rejects of a manifest file."""
    path = absolute(require(cfg.captions, "captions", "manifest"))
    kind = manifest_kind(path)
    columns = [cfg.image_column, *cfg.caption_columns, *([cfg.id_column] if cfg.id_column else [])]
    base = absolute(cfg.images) if cfg.images else dirname(path)
    log.info("manifest: reading %s (%s); relative image paths from %s", path, kind, base)
    for row in _rows(path, kind, columns):
        yield row if isinstance(row, Reject) else _to_sample(row, cfg, path, base)


def manifest_kind(path: str) -> str:
    """``csv``, ``tsv``, ``jsonl``, ``json`` or ``parquet`` from the file's extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _KINDS:
        raise IngestError(f"{path}: unknown manifest type {ext or '(no extension)'!r}; "
                          f"expected one of {', '.join(sorted(_KINDS))}")
    return _KINDS[ext]


def image_id_for(image: str) -> str:
    """The stable image_id of a manifest image cell (see the module docstring)."""
    if fs.is_remote(image):
        return "url-" + hashlib.sha256(image.encode("utf-8")).hexdigest()[:16]
    return posixpath.normpath(image.removeprefix("file://").replace("\\", "/"))


def _rows(path: str, kind: str, columns: list[str]) -> Iterator[_Row | Reject]:
    if kind in ("csv", "tsv"):
        return _csv_rows(path, "\t" if kind == "tsv" else ",", columns)
    if kind == "parquet":
        return _parquet_rows(path, columns)
    lines = numbered_lines(path)
    first = next((text for _, text in lines if text and text.strip()), "")
    if kind == "json" and first.lstrip().startswith("["):
        return _json_array_rows(path, columns)
    return _jsonl_rows(path, lines, columns)


def _missing_column(path: str, column: str, found: list[str]) -> IngestError:
    return IngestError(f"{path}: no column {column!r} (configured in dataset); columns found: "
                       f"{', '.join(map(repr, found)) or 'none'}")


def _check_columns(path: str, columns: list[str], found: list[str]) -> None:
    for column in columns:
        if column not in found:
            raise _missing_column(path, column, found)


def _csv_rows(path: str, delimiter: str, columns: list[str]) -> Iterator[_Row | Reject]:
    lines = numbered_lines(path)
    for number, text in lines:
        if text is None:
            yield undecodable(path, number)
    header: list[str] | None = None
    for record in csv_records(progress(lines, "manifest", total=len(lines), unit="line"), delimiter):
        item = f"line {record.first}"
        if record.error is not None:
            yield reject(path, item, "malformed", f"{line_span(record.first, record.last)}: not valid CSV: "
                                                  f"{record.error}")
        elif header is None:
            header = [name.strip() for name in record.fields]
            _check_columns(path, columns, header)
        elif len(record.fields) != len(header):
            yield reject(path, item, "malformed", f"{len(record.fields)} fields, the header has {len(header)}: "
                                                  f"{clip_text(delimiter.join(record.fields))!r}")
        else:
            yield _Row(item, dict(zip(header, record.fields)), from_text=True)
    if header is None:
        raise IngestError(f"{path}: empty manifest (no header)")


def _jsonl_rows(path: str, lines: list[tuple[int, str | None]], columns: list[str]) -> Iterator[_Row | Reject]:
    checked = False
    for number, text in progress(lines, "manifest", total=len(lines), unit="line"):
        item = f"line {number}"
        if text is None:
            yield undecodable(path, number)
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield reject(path, item, "malformed", f"not valid JSON ({exc}): {clip_text(text)!r}")
            continue
        if not isinstance(value, dict):
            yield reject(path, item, "malformed", f"expected a JSON object, found {type(value).__name__}")
            continue
        if not checked:
            _check_columns(path, columns, list(value))
            checked = True
        yield _Row(item, value, from_text=False)


def _json_array_rows(path: str, columns: list[str]) -> Iterator[_Row | Reject]:
    try:
        records = json.loads(fs.read_bytes(path))
    except ValueError as exc:
        raise IngestError(f"{path}: not valid JSON: {exc}") from exc
    checked = False
    for index, value in enumerate(records, start=1):
        item = f"item {index}"
        if not isinstance(value, dict):
            yield reject(path, item, "malformed", f"expected a JSON object, found {type(value).__name__}")
            continue
        if not checked:
            _check_columns(path, columns, list(value))
            checked = True
        yield _Row(item, value, from_text=False)


def _parquet_rows(path: str, columns: list[str]) -> Iterator[_Row | Reject]:
    import pyarrow.parquet as pq

    with open_binary(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:
            raise IngestError(f"{path}: not a readable Parquet file: {exc}") from exc
        _check_columns(path, columns, parquet.schema_arrow.names)
        number = 0
        bar = progress(range(parquet.metadata.num_rows), "manifest", total=parquet.metadata.num_rows, unit="row")
        for batch in parquet.iter_batches(columns=list(dict.fromkeys(columns))):
            for values in batch.to_pylist():
                number += 1
                next(bar, None)
                yield _Row(f"row {number}", values, from_text=False)


def _to_sample(row: _Row, cfg: DatasetConfig, source: str, base: str) -> Sample | Reject:
    image = row.values.get(cfg.image_column)
    if image is not None and not isinstance(image, str):
        return reject(source, row.item, "malformed",
                      f"image column {cfg.image_column!r} holds a {type(image).__name__}, expected a path or URL")
    image = (image or "").strip()
    if not image:
        return reject(source, row.item, "malformed", f"empty image column {cfg.image_column!r}")
    try:
        captions = row_captions(row.values, cfg.caption_columns, row.from_text)
    except BadCell as exc:
        return reject(source, row.item, "malformed", str(exc))
    if not captions:
        return reject(source, row.item, "no_caption",
                      f"no caption in column(s) {', '.join(cfg.caption_columns)} for {clip_text(image)}")
    image_id = image_id_for(image)
    if cfg.id_column:
        value = row.values.get(cfg.id_column)
        if value is None or not str(value).strip():
            return reject(source, row.item, "malformed", f"empty id column {cfg.id_column!r}")
        image_id = str(value).strip()
    uri = _uri(image, base)
    if not fs.is_remote(uri) and not os.path.isfile(uri):
        hint = "" if cfg.images or os.path.isabs(image) else \
            " (relative paths are taken from the manifest's folder unless dataset.images names another)"
        return reject(source, row.item, "missing_image", f"image {image!r} not found at {uri}{hint}")
    return Sample(image_id=image_id, uri=uri, captions=captions, caption=captions[0], source=source)


def _uri(image: str, base: str) -> str:
    if fs.is_remote(image):
        return image
    local = image.removeprefix("file://")
    if fs.is_remote(base):
        return fs.join(base, local.replace("\\", "/"))
    return os.path.normpath(os.path.join(base, local))


def row_captions(values: dict[str, Any], columns: list[str], from_text: bool = False) -> list[str]:
    """The captions of one record over its caption ``columns`` (:func:`cell_captions` each, in column order);
    :class:`BadCell` naming the column whose cell holds something else."""
    captions: list[str] = []
    for column in columns:
        try:
            captions.extend(cell_captions(values.get(column), from_text))
        except BadCell as exc:
            raise BadCell(f"caption column {column!r} {exc}") from None
    return captions


def cell_captions(value: Any, from_text: bool = False) -> list[str]:
    """The non-empty captions of one cell: a string, a list of strings, or (``from_text``) a JSON-encoded list."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if from_text and text.startswith("[") and text.endswith("]"):
            parsed = _json_list(text)
            if parsed is not None:
                return parsed
        return [text] if text else []
    if isinstance(value, (list, tuple)):
        captions = []
        for element in value:
            if element is not None and not isinstance(element, str):
                raise BadCell(f"holds a list with a {type(element).__name__}, expected strings")
            if element and element.strip():
                captions.append(element.strip())
        return captions
    raise BadCell(f"holds a {type(value).__name__}, expected a string or a list of strings")


def _json_list(text: str) -> list[str] | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    if isinstance(parsed, list) and all(isinstance(element, str) for element in parsed):
        return [element.strip() for element in parsed if element.strip()]
    return None
