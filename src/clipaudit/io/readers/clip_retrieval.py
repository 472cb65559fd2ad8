"""clip-retrieval's ``inference`` output folder as a corpus (``dataset.format: clip_retrieval``).

Users who already built a `clip-retrieval <https://github.com/rom1504/clip-retrieval>`_ index hold CLIP vectors
for their images. Its output folder (``dataset.path``, local or ``s3://``) holds::

    metadata/metadata_0.parquet, metadata_1.parquet, ...   one row per image
    img_emb/img_emb_0.npy, img_emb_1.npy, ...              row i = the image of row i of metadata_N.parquet
    text_emb/text_emb_0.npy, ...                           (when captions were embedded) the caption of row i

This reader streams the metadata shards in shard order (the numeric order of ``N``: ``metadata_2`` before
``metadata_10``), record batch by record batch, and yields one :class:`Sample` per row: ``uri`` from the
``image_path`` column (inputs that were image files) or, without it, the ``url`` column (webdataset inputs that
kept their URLs); ``captions`` = ``[caption]`` from the ``caption`` column. A metadata file without either image
column (webdataset input with ``__key__`` only: the images themselves are not reachable) or without a ``caption``
column is an :class:`IngestError` naming the file. The vectors are not read here: the spec
``precomputed:INDEX_DIR`` in ``models.clip`` makes the embed stage read them (:mod:`clipaudit.models.precomputed`,
which also lists the index's shards: the model registry must not import this reader, which reads the config).

A relative ``image_path`` is taken from ``dataset.images`` when it is set, else from the index folder's parent
(clip-retrieval writes the paths as it was given them, relative to the folder it ran in, which usually holds both
the images and the index). ``image_id`` is :func:`~clipaudit.io.readers.manifest.image_id_for` of the cell as
written (the manifest reader's ids: the normalised relative path, or ``url-`` + a hash for a URL), so it does not
depend on ``dataset.images`` and the embed stage finds each row's id without reading any image.

Rejects (source: the metadata file, item: ``row N``, counted from 1 within the file): ``malformed`` (an empty
or non-string image cell), ``no_caption`` (an empty caption), ``duplicate`` (an image_id seen on an earlier row:
the first row wins, here and in the embed stage), ``missing_image`` (a local file that is not there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs
from clipaudit.io.readers.common import (
    IngestError,
    absolute,
    basename,
    dirname,
    log,
    open_binary,
    progress,
    reject,
    require,
)
from clipaudit.io.readers.manifest import image_id_for
from clipaudit.models.precomputed import metadata_files
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipaudit.config import DatasetConfig

IMAGE_COLUMNS = ("image_path", "url")
"""The metadata columns an image is read from, in order of preference."""
CAPTION_COLUMN = "caption"
BATCH_ROWS = 16_384
"""Metadata rows per record batch."""


def image_column(path: str, names: list[str]) -> str:
    """The column of metadata file ``path`` that names each row's image (see :data:`IMAGE_COLUMNS`)."""
    for column in IMAGE_COLUMNS:
        if column in names:
            return column
    hint = (" (an index built from webdataset input without its URLs: __key__ alone does not locate the images, "
            "which the audit reads)" if "__key__" in names else "")
    raise IngestError(f"{path}: no image_path or url column (columns: {', '.join(names) or 'none'}){hint}")


def open_metadata(handle: Any, path: str) -> pq.ParquetFile:
    """The Parquet file of metadata shard ``path`` from an open handle; IngestError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(handle)
    except Exception as exc:
        raise IngestError(f"{path}: not a readable Parquet file: {exc}") from exc


def metadata_batches(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """``columns`` of a metadata file, record batch by record batch, in row order."""
    yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def image_cell(value: Any) -> str | None:
    """A metadata image cell as the image path or URL it names (stripped); None when empty or not a string."""
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def row_image_id(value: Any) -> str | None:
    """The ``image_id`` of a metadata row from its image cell, as this reader derives it (None: no usable cell)."""
    image = image_cell(value)
    return None if image is None else image_id_for(image)


def _uri(image: str, base: str) -> str:
    if fs.is_remote(image):
        return image
    local = image.removeprefix("file://")
    if os.path.isabs(local):
        return os.path.normpath(local)
    if fs.is_remote(base):
        return fs.join(base, local.replace("\\", "/"))
    return os.path.normpath(os.path.join(base, local))


def read_clip_retrieval(cfg: DatasetConfig) -> Iterator[Sample | Reject]:
    """Samples and rejects of a clip-retrieval index folder (see the module docstring)."""
    index_dir = absolute(require(cfg.path, "path", "clip_retrieval"))
    base = absolute(cfg.images) if cfg.images else dirname(index_dir.rstrip("/"))
    files = metadata_files(index_dir)
    log.info("clip_retrieval: %d metadata shard(s) in %s; relative image paths from %s", len(files), index_dir, base)
    first_seen: dict[str, str] = {}
    for _, path in files:
        with open_binary(path) as handle:
            parquet = open_metadata(handle, path)
            names = parquet.schema_arrow.names
            column = image_column(path, names)
            if CAPTION_COLUMN not in names:
                raise IngestError(f"{path}: no {CAPTION_COLUMN!r} column (columns: {', '.join(names)}): the audit "
                                  "needs a caption per image (run clip-retrieval inference with captions)")
            row = 0
            batches = metadata_batches(parquet, [column, CAPTION_COLUMN])
            for batch in progress(batches, f"clip-retrieval {basename(path)}", unit="batch"):
                for image_value, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    row += 1
                    yield _row(path, f"row {row}", column, image_value, caption, base, first_seen)


def _row(path: str, item: str, column: str, value: Any, caption: Any, base: str,
         first_seen: dict[str, str]) -> Sample | Reject:
    image = image_cell(value)
    if image is None:
        what = "empty" if value is None or isinstance(value, str) else f"a {type(value).__name__} in the"
        return reject(path, item, "malformed", f"{what} {column} cell")
    image_id = image_id_for(image)
    first = first_seen.get(image_id)
    if first is not None:
        return reject(path, item, "duplicate", f"image_id {image_id} already read from {first}")
    first_seen[image_id] = f"{basename(path)} {item}"
    text = caption.strip() if isinstance(caption, str) else ""
    if not text:
        return reject(path, item, "no_caption", f"empty {CAPTION_COLUMN} for {image}")
    uri = _uri(image, base)
    if not fs.is_remote(uri) and not os.path.isfile(uri):
        return reject(path, item, "missing_image", f"image {image!r} not found at {uri} (relative paths are taken "
                                                   "from dataset.images, else from the index folder's parent)")
    return Sample(image_id=image_id, uri=uri, captions=[text], caption=text, source=path)
