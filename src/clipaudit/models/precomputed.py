"""``precomputed:INDEX_DIR``: CLIP vectors read from a clip-retrieval index instead of computed.

A user with a clip-retrieval index (see :mod:`clipaudit.io.readers.clip_retrieval` for its layout) already holds
the CLIP image vectors of millions of images, and often the text vectors of their captions: computing them again
is the dearest part of an audit. With ``models.clip: precomputed:INDEX_DIR`` the embed stage reads them, shard
by shard and memory-mapped, instead of sending the images through a model; the reference model (DINOv2) is still
computed from the images, as it must be.

The spec resolves on the driver without loading anything: the index folder is listed, and the dimension is read
from the header of the first ``img_emb`` file. ``INDEX_DIR`` is a local folder (relative to the current
directory) or an ``s3://`` URI. Only the CLIP role takes such a spec: the reference must see the images. There
are no weights, so :meth:`PrecomputedTarget.load` refuses: whatever needs the model itself (TCAC transforms the
images and re-embeds them; ``validate`` and ``score`` encode new texts) cannot run on it, and the tcac stage skips
such a model with a note.

:func:`index_shards` lists an index's shards (for this registry, the ``clip_retrieval`` reader and the embed
stage; it lives here because the registry must not import the readers, which read the config).
:class:`NpyShard` reads one ``.npy`` file: memory-mapped when local (``np.load(mmap_mode="r")``), by ranged reads
on an object store; either way only the rows asked for are read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.errors import ClipauditError

from .errors import ModelSpecError

if TYPE_CHECKING:
    from .base import LoadedModel
    from .resolved import ResolvedModel

PREFIX = "precomputed:"
KIND = "precomputed"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
"""The vector dtypes clip-retrieval writes (either byte order is accepted)."""
_METADATA_NAME = re.compile(r"^metadata_(\d+)\.parquet$")


class PrecomputedIndexError(ClipauditError, ValueError):
    """A clip-retrieval index that cannot be read as vectors (misaligned shards, a wrong dtype or shape); the
    message names the files."""


class NoWeightsError(ClipauditError, RuntimeError):
    """Something asked a precomputed model for a forward pass: its vectors are read, not computed."""


@dataclass(frozen=True)
class PrecomputedTarget:
    """What ``precomputed:INDEX_DIR`` resolved to: the index folder (absolute, or a URI), how many shards it has,
    the vectors' dimension and whether it holds text vectors (``text_emb/``)."""

    index_dir: str
    shards: int
    dim: int
    has_text: bool

    def describe(self, resolved: ResolvedModel) -> dict[str, Any]:
        """No weights: the vectors' index, for :func:`~clipaudit.models.provenance.provenance`."""
        return {"backend": "precomputed", "source": f"precomputed, from {self.index_dir}", "shards": self.shards}

    def load(self, resolved: ResolvedModel, device: str) -> LoadedModel:
        """Refuse: a precomputed model has no weights (raises :class:`NoWeightsError`)."""
        raise NoWeightsError(
            f"model {resolved.spec!r} has no weights to load on {device}: its vectors are read from the "
            f"clip-retrieval index {self.index_dir} by the embed stage, not computed. Steps that need the model "
            "itself (TCAC's transformed images, new texts in validate or score) cannot use it: name the model the "
            "index was built with (e.g. open_clip:ViT-L-14/openai) for them")


def is_precomputed(model: Any) -> bool:
    """Whether a :class:`~clipaudit.models.resolved.ResolvedModel` reads precomputed vectors."""
    return isinstance(getattr(model, "target", None), PrecomputedTarget)


def index_location(body: str) -> str:
    """The index folder a spec body names: a URI as is, a local path absolute (relative to the current directory)."""
    from clipaudit.io import fs

    text = body.strip()
    if fs.is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def resolve(spec: str, body: str, role: str) -> PrecomputedTarget:
    """Check a ``precomputed:`` spec on the driver (nothing is loaded): the role, the index folder, its first
    ``img_emb`` header. ModelSpecError naming the spec when it cannot be used."""
    if role != "clip":
        raise ModelSpecError(f"model spec {spec!r} cannot fill the {role} role: precomputed vectors are accepted "
                             "in models.clip only; the reference model must see the images (e.g. "
                             "hf:facebook/dinov2-base)")
    from clipaudit.io.readers.common import IngestError

    index_dir = index_location(body)
    try:
        shards = index_shards(index_dir)
        shape, dtype = NpyShard.header(shards[0].img_emb)
    except (IngestError, PrecomputedIndexError, OSError) as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot read the clip-retrieval index {index_dir}: {exc}") from exc
    if len(shape) != 2 or dtype not in DTYPES:
        raise ModelSpecError(f"model spec {spec!r}: {shards[0].img_emb} holds a {dtype} array of shape {shape}, "
                             "expected 2-D float16 or float32 vectors")
    return PrecomputedTarget(index_dir, len(shards), int(shape[1]), any(s.text_emb for s in shards))


@dataclass(frozen=True)
class IndexShard:
    """One shard of a clip-retrieval index: its number ``N`` and its files (``text_emb`` None when the index has no
    text vectors for it)."""

    number: int
    metadata: str
    img_emb: str
    text_emb: str | None


def metadata_files(index_dir: str) -> list[tuple[int, str]]:
    """``(N, path)`` of every ``metadata/metadata_N.parquet`` of the index, in numeric order of ``N``
    (``metadata_2`` before ``metadata_10``); IngestError when there is none."""
    from clipaudit.io import fs
    from clipaudit.io.readers.common import IngestError, list_files

    folder = fs.join(index_dir, "metadata")
    if not fs.exists(folder):
        raise IngestError(f"{index_dir}: not a clip-retrieval index folder (no metadata/ folder in it)")
    found = []
    for entry in list_files(folder):
        match = _METADATA_NAME.match(entry.rel)
        if match:
            found.append((int(match.group(1)), entry.path))
    if not found:
        raise IngestError(f"{folder}: no metadata_N.parquet files")
    numbers = [number for number, _ in found]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise IngestError(f"{folder}: shard number {repeated[0]} appears twice (e.g. metadata_1 and metadata_01)")
    return sorted(found)


def index_shards(index_dir: str) -> list[IndexShard]:
    """The shards of the index, in numeric order; IngestError naming the metadata file whose ``img_emb`` file is
    missing. A ``text_emb`` file is optional (None when absent)."""
    from clipaudit.io import fs
    from clipaudit.io.readers.common import IngestError

    shards = []
    for number, metadata in metadata_files(index_dir):
        img_emb = fs.join(index_dir, "img_emb", f"img_emb_{number}.npy")
        if not fs.exists(img_emb):
            raise IngestError(f"{metadata} has no image vectors: {img_emb} not found")
        text_emb = fs.join(index_dir, "text_emb", f"text_emb_{number}.npy")
        shards.append(IndexShard(number, metadata, img_emb, text_emb if fs.exists(text_emb) else None))
    return shards


class NpyShard:
    """One ``.npy`` file of vectors, read by row ranges: memory-mapped when local, ranged reads on an object store.

    Attributes:
        path: the file.
        shape: its shape.
        dtype: its dtype (native byte order or not).
    """

    def __init__(self, path: str) -> None:
        from clipaudit.io import fs

        self.path = path
        self._array: np.ndarray | None = None
        self._handle: Any = None
        if fs.is_remote(path):
            from clipaudit.io.readers.common import open_binary

            self._handle = open_binary(path)
            self.shape, self.dtype, self._offset = _read_header(self._handle, path)
        else:
            try:
                self._array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise PrecomputedIndexError(f"{path}: not a readable .npy array: {exc}") from exc
            self.shape, self.dtype = tuple(self._array.shape), self._array.dtype

    @staticmethod
    def header(path: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of a ``.npy`` file, reading only its header (memory-mapped when local)."""
        shard = NpyShard(path)
        try:
            return shard.shape, shard.dtype
        finally:
            shard.close()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (a view of the memory map when local, read when remote)."""
        if self._array is not None:
            return self._array[start:stop]
        width = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        row_bytes = width * self.dtype.itemsize
        self._handle.seek(self._offset + start * row_bytes)
        data = self._handle.read((stop - start) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def close(self) -> None:
        """Release the memory map or the handle."""
        self._array = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> NpyShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_header(handle: Any, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from the header of an open ``.npy`` file."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = npy.read_array_header_2_0(handle)
    except ValueError as exc:
        raise PrecomputedIndexError(f"{path}: not a readable .npy array: {exc}") from exc
    if fortran and len(shape) > 1:
        raise PrecomputedIndexError(f"{path}: a Fortran-ordered array; clip-retrieval writes C order")
    return tuple(shape), dtype, handle.tell()
