"""Hugging Face datasets: a ``save_to_disk`` folder, Parquet or Arrow files, or a dataset in the Hugging Face cache.

``dataset.path`` is one of:

- a ``Dataset.save_to_disk`` folder (``state.json`` names its Arrow files), or a ``DatasetDict`` one
  (``dataset_dict.json``: ``dataset.split`` picks the split, default ``train``);
- a ``.parquet`` or ``.arrow`` file, or a folder of them (searched recursively, in name order; with
  ``dataset.split`` set, only files whose name starts with the split, as the Hub lays them out:
  ``data/train-00000-of-00002.parquet``);
- ``ORG/NAME``, a dataset repo in the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``): its newest snapshot, read as a folder (nothing is downloaded).

Local or ``s3://`` paths alike. Files are streamed record batch by record batch, never loaded whole.

``dataset.image_column`` holds ``datasets.Image`` values (a struct of ``bytes`` and ``path``), raw bytes, or a
path (relative to the dataset's folder, or absolute, or a URL). Embedded bytes are written once into the run's
work folder (``work_dir/hf/<file>/<row>.<ext>``, only where missing), so the embed stage reads every image the same
way. ``dataset.caption_columns`` hold a string or a list of strings (``caption_choice`` then picks one);
``dataset.id_column`` optionally the id, else ``image_id`` is ``<file stem>/<row>``.

Rejects (source: the file, item: ``row N``, from 1): ``malformed`` (an empty or unusable image cell, a caption cell
of the wrong type), ``no_caption``, ``missing_image`` (a path that does not exist).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.io import fs
from clipaudit.io.hf_cache import cached_snapshot, hub_cache
from clipaudit.io.readers.common import (
    IngestError,
    absolute,
    basename,
    dirname,
    list_files,
    log,
    open_binary,
    progress,
    reject,
    require,
)
from clipaudit.io.readers.manifest import BadCell, row_captions
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig

DATA_SUFFIXES = (".parquet", ".arrow")
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"RIFF", ".webp"),
               (b"BM", ".bmp"))


def data_files(path: str, split: str | None) -> list[str]:
    """The Parquet / Arrow files of the dataset at ``path`` (see the module docstring), in reading order."""
    if not fs.is_remote(path) and not os.path.exists(path) and path.count("/") == 1:
        snapshot = cached_snapshot(path)
        if snapshot is None:
            raise IngestError(f"dataset.path: {path!r} is neither a file or folder here nor a dataset in the "
                              f"Hugging Face cache ({hub_cache()}); nothing is downloaded")
        path = snapshot
    path = absolute(path)
    if path.endswith(DATA_SUFFIXES):
        if not fs.exists(path):
            raise IngestError(f"dataset.path: file not found: {path}")
        return [path]
    if fs.exists(fs.join(path, "dataset_dict.json")):
        splits = json.loads(fs.read_bytes(fs.join(path, "dataset_dict.json"))).get("splits") or []
        chosen = split or "train"
        if chosen not in splits:
            raise IngestError(f"dataset.split: {path} has splits {', '.join(splits)}, not {chosen!r}")
        return data_files(fs.join(path, chosen), None)
    if fs.exists(fs.join(path, "state.json")):
        state = json.loads(fs.read_bytes(fs.join(path, "state.json")))
        return [fs.join(path, item["filename"]) for item in state.get("_data_files") or []]
    files = [entry for entry in list_files(path, recursive=True) if entry.rel.endswith(DATA_SUFFIXES)
             and not posixpath.basename(entry.rel).startswith("cache-")]
    if split:
        files = [entry for entry in files if posixpath.basename(entry.rel).startswith(split)]
    if not files:
        raise IngestError(f"dataset.path: no {' or '.join(DATA_SUFFIXES)} files in {path}"
                          + (f" for split {split!r}" if split else ""))
    return [entry.path for entry in files]


def record_batches(path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The record batches of one Parquet or Arrow file (IPC stream, as ``datasets`` writes it, or file format),
    only ``columns``; IngestError naming the file and the column when one is missing."""
    with open_binary(path) as handle:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                parquet = pq.ParquetFile(handle)
            except Exception as exc:
                raise IngestError(f"{path}: not a readable Parquet file: {exc}") from exc
            _check(path, columns, parquet.schema_arrow.names)
            yield from parquet.iter_batches(batch_size=256, columns=columns)
            return
        try:
            reader: Any = pa.ipc.open_stream(handle)
        except pa.ArrowInvalid:
            handle.seek(0)
            try:
                reader = pa.ipc.open_file(handle)
            except pa.ArrowInvalid as exc:
                raise IngestError(f"{path}: not a readable Arrow file: {exc}") from exc
            _check(path, columns, reader.schema.names)
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index).select(columns)
            return
        _check(path, columns, reader.schema.names)
        for batch in reader:
            yield batch.select(columns)


def _check(path: str, columns: list[str], found: list[str]) -> None:
    for column in columns:
        if column not in found:
            raise IngestError(f"{path}: no column {column!r} (columns: {', '.join(found)}); set "
                              "dataset.image_column / dataset.caption_columns / dataset.id_column")


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (``.img`` when unknown: the embed stage decodes by content)."""
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    return ".img"


def _image(value: Any, column: str, base: str) -> tuple[bytes | None, str | None]:
    """(embedded bytes, path or URL) of an image cell; BadCell when it holds neither."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    elif value is None:
        raise BadCell(f"empty image column {column!r}")
    else:
        raise BadCell(f"image column {column!r} holds a {type(value).__name__}, expected an image")
    if data:
        return bytes(data), None
    if path and path.strip():
        path = path.strip()
        if fs.is_remote(path) or os.path.isabs(path):
            return None, path
        return None, fs.join(base, path) if fs.is_remote(base) else os.path.normpath(os.path.join(base, path))
    raise BadCell(f"image column {column!r} holds neither bytes nor a path")


def _stem(path: str) -> str:
    name = basename(path)
    for suffix in DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def read_hf_dataset(cfg: DatasetConfig, work_dir: str) -> Iterator[Sample | Reject]:
    """Samples and rejects of a Hugging Face dataset (see the module docstring)."""
    path = require(cfg.path, "path", "hf_dataset")
    files = data_files(path, cfg.split)
    columns = list(dict.fromkeys([cfg.image_column, *cfg.caption_columns, *([cfg.id_column] if cfg.id_column else [])]))
    extracted = fs.join(absolute(work_dir), "hf")
    written = 0
    for file in files:
        base = dirname(file)
        stem = _stem(file)
        row = 0
        for batch in progress(record_batches(file, columns), f"hf dataset {basename(file)}", unit="batch"):
            for values in batch.to_pylist():
                row += 1
                item = f"row {row}"
                try:
                    data, uri = _image(values.get(cfg.image_column), cfg.image_column, base)
                    captions = row_captions(values, cfg.caption_columns)
                except BadCell as exc:
                    yield reject(file, item, "malformed", str(exc))
                    continue
                if not captions:
                    yield reject(file, item, "no_caption", f"no caption in column(s) {', '.join(cfg.caption_columns)}")
                    continue
                image_id = f"{stem}/{row:06d}"
                if cfg.id_column:
                    value = values.get(cfg.id_column)
                    if value is None or not str(value).strip():
                        yield reject(file, item, "malformed", f"empty id column {cfg.id_column!r}")
                        continue
                    image_id = str(value).strip()
                if data is not None:
                    uri = fs.join(extracted, stem, f"{row:06d}{image_extension(data)}")
                    if not fs.exists(uri):
                        fs.write_bytes(uri, data)
                        written += 1
                elif uri is not None and not fs.is_remote(uri) and not os.path.isfile(uri):
                    yield reject(file, item, "missing_image", f"image {uri} not found")
                    continue
                yield Sample(image_id=image_id, uri=str(uri), captions=captions, caption=captions[0], source=file)
    log.info("hf_dataset: %d file(s) read from %s; %d embedded images written to %s", len(files), path, written,
             extracted)
