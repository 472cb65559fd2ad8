"""Corpus readers: every captioned corpus format becomes one stream of :class:`Sample` and :class:`Reject`.

:func:`read_corpus` dispatches on ``dataset.format``. Readers never crash on bad input: each input line, row,
file or tar key ends either as a sample or as a reject (``stage="ingest"``) with its source file, the item
inside it (``line N``, ``row N``, an image name or a key), a reason code and a human-readable detail.
Problems with the configuration itself (a missing column, an unreadable class-name file) raise
:class:`IngestError`, naming the file.

Reject reasons written by the readers:

* ``malformed``: a line, row or cell that cannot be parsed, or a required field that is empty;
* ``missing_image``: a captioned image that is not there (not in the folder, no image for a tar key);
* ``no_caption``: an image without any non-empty caption;
* ``not_an_image_file`` / ``not_in_class_folder``: stray files in an ImageFolder tree;
* ``corrupt_shard`` / ``empty_shard``: a WebDataset tar that cannot be read, or holds nothing;
* ``duplicate``: a clip-retrieval metadata row whose image was already read from an earlier row.

Readers fill ``Sample.caption`` with the first caption; the ingest stage applies ``caption_choice``.
All file access goes through :mod:`clipaudit.io.fs` or pyarrow filesystems, so ``s3://`` works too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from clipaudit.io.readers.common import STAGE, IngestError
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig

__all__ = ["STAGE", "IngestError", "read_corpus"]


def read_corpus(cfg: DatasetConfig, work_dir: str) -> Iterator[Sample | Reject]:
    """Read the corpus described by ``cfg`` as a stream of samples and rejects.

    ``work_dir`` is a folder a reader may write into (the synthetic reader writes its images there).
    Raises :class:`IngestError` for configuration-level problems; bad input becomes rejects.
    """
    if cfg.format == "flickr8k":
        from clipaudit.io.readers.flickr8k import read_flickr8k

        return read_flickr8k(cfg)
    if cfg.format == "manifest":
        from clipaudit.io.readers.manifest import read_manifest

        return read_manifest(cfg)
    if cfg.format == "imagefolder":
        from clipaudit.io.readers.imagefolder import read_imagefolder

        return read_imagefolder(cfg)
    if cfg.format == "webdataset":
        from clipaudit.io.readers.webdataset import read_webdataset

        return read_webdataset(cfg)
    if cfg.format == "hf_dataset":
        from clipaudit.io.readers.hf_dataset import read_hf_dataset

        return read_hf_dataset(cfg, work_dir)
    if cfg.format == "clip_retrieval":
        from clipaudit.io.readers.clip_retrieval import read_clip_retrieval

        return read_clip_retrieval(cfg)
    if cfg.format == "synthetic":
        from clipaudit.io.readers.synthetic import read_synthetic

        return read_synthetic(cfg, work_dir)
    raise IngestError(f"dataset.format: unknown format {cfg.format!r}")
