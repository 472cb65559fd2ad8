"""WebDataset tar shards as img2dataset writes them: ``KEY.jpg`` with ``KEY.txt`` and/or ``KEY.json``.

``dataset.images`` is one ``.tar`` or a folder of ``.tar`` shards (read in name order; other files such as
img2dataset's ``.parquet`` and ``_stats.json`` are ignored). Members are grouped by key as WebDataset does:
the member path up to the first dot of its file name (``dir/000001.jpg`` -> ``dir/000001``). A key's
captions are the ``.txt`` text, then the ``.json`` ``caption`` field (a string or a list) where it differs.

Rejects (source: the shard): ``no_caption`` (an image without caption), ``missing_image`` (a caption without
image), ``malformed`` (a key with neither, an unreadable ``.txt`` or ``.json``), item: the key;
``corrupt_shard`` (the tar cannot be read or is truncated: the whole shard, the other shards go on) and
``empty_shard``, item: the shard's file name.

``uri`` is ``path/to/shard.tar::KEY.jpg`` (read by :func:`clipaudit.io.fs.read_bytes`); ``image_id`` is
``shardstem/KEY``.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from clipaudit.io.fs import TAR_SEPARATOR
from clipaudit.io.readers.common import (
    IMAGE_EXTENSIONS,
    IngestError,
    absolute,
    basename,
    clip_text,
    list_files,
    log,
    open_binary,
    progress,
    reject,
    require,
)
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig

_CAPTION_EXTS = ("txt", "json")


@dataclass
class _Key:
    """What one key of a shard holds: its image member, caption files' bytes, and other member names."""

    image: str | None = None
    texts: dict[str, bytes] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)


class CorruptShard(Exception):
    """A shard that cannot be read whole."""


class BadCaptionFile(ValueError):
    """A key's ``.txt`` or ``.json`` that cannot be read as captions."""


def read_webdataset(cfg: DatasetConfig) -> Iterator[Sample | Reject]:
    """Samples and rejects of WebDataset tar shards."""
    shards = list_shards(absolute(require(cfg.images, "images", "webdataset")))
    log.info("webdataset: %d shards", len(shards))
    for shard in progress(shards, "webdataset shards", total=len(shards), unit="shard"):
        yield from read_shard(shard)


def list_shards(images: str) -> list[str]:
    """The ``.tar`` shards: ``images`` itself when it is a .tar, else the folder's .tar files in name order."""
    if images.lower().endswith(".tar"):
        return [images]
    shards = [entry.path for entry in list_files(images) if entry.rel.lower().endswith(".tar")]
    if not shards:
        raise IngestError(f"{images}: no .tar shards in this folder")
    return shards


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits them: at the first dot of the file name."""
    folder, file = posixpath.split(name)
    stem, _, ext = file.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext


def read_shard(shard: str) -> Iterator[Sample | Reject]:
    """Samples and rejects of one shard; a shard that cannot be read is one ``corrupt_shard`` reject."""
    name = basename(shard)
    try:
        keys = scan_shard(shard)
    except CorruptShard as exc:
        yield reject(shard, name, "corrupt_shard", f"cannot read {shard}: {exc}; none of its members are used")
        return
    if not keys:
        yield reject(shard, name, "empty_shard", f"{shard} holds no files")
        return
    stem = name[: -len(".tar")] if name.lower().endswith(".tar") else name
    for key, content in keys.items():
        yield _key_item(shard, stem, key, content)


def scan_shard(shard: str) -> dict[str, _Key]:
    """Every key of a shard with its image member name and caption files' bytes; raises :class:`CorruptShard`."""
    keys: dict[str, _Key] = {}
    try:
        with open_binary(shard) as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    if member.offset_data + member.size > size:
                        raise CorruptShard(f"member {member.name} is truncated")
                    if member.isfile():
                        _add_member(tar, member, keys)
                _check_end(handle, tar.offset)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise CorruptShard(f"{type(exc).__name__}: {exc}") from exc
    return keys


def _check_end(handle: BinaryIO, offset: int) -> None:
    """tarfile stops quietly at a bad header after the first member: what follows the last one must be zeros."""
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise CorruptShard(f"invalid tar header at byte {offset}; the members after it cannot be read")


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, keys: dict[str, _Key]) -> None:
    key, ext = split_key(member.name)
    entry = keys.setdefault(key, _Key())
    if "." + ext.lower() in IMAGE_EXTENSIONS and entry.image is None:
        entry.image = member.name
    elif ext.lower() in _CAPTION_EXTS and ext.lower() not in entry.texts:
        handle = tar.extractfile(member)
        entry.texts[ext.lower()] = handle.read() if handle is not None else b""
    else:
        entry.others.append(member.name)


def _key_item(shard: str, stem: str, key: str, content: _Key) -> Sample | Reject:
    try:
        captions = key_captions(content.texts)
    except BadCaptionFile as exc:
        return reject(shard, key, "malformed", f"key {key}: {exc}")
    if content.image is None:
        if content.texts:
            return reject(shard, key, "missing_image",
                          f"key {key} has a caption ({', '.join(sorted(content.texts))}) but no image")
        return reject(shard, key, "malformed",
                      f"key {key} has neither image nor caption: {clip_text(', '.join(content.others))}")
    if not captions:
        return reject(shard, key, "no_caption", f"key {key} has an image ({content.image}) but no caption "
                                                "(no .txt, and no 'caption' in .json)")
    return Sample(image_id=f"{stem}/{key}", uri=f"{shard}{TAR_SEPARATOR}{content.image}", captions=captions,
                  caption=captions[0], source=shard)


def key_captions(texts: dict[str, bytes]) -> list[str]:
    """Captions from a key's ``.txt`` then ``.json`` (``caption``: a string or a list).

    Raises :class:`BadCaptionFile` when either cannot be read.
    """
    captions: list[str] = []
    if "txt" in texts:
        try:
            text = texts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise BadCaptionFile(f".txt is not valid UTF-8 ({exc})") from exc
        if text:
            captions.append(text)
    if "json" in texts:
        captions.extend(c for c in _json_captions(texts["json"]) if c not in captions)
    return captions


def _json_captions(data: bytes) -> list[str]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise BadCaptionFile(f".json is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BadCaptionFile(f".json holds a {type(value).__name__}, expected an object")
    caption = value.get("caption")
    if caption is None:
        return []
    if isinstance(caption, str):
        return [caption.strip()] if caption.strip() else []
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return [c.strip() for c in caption if c.strip()]
    raise BadCaptionFile(f".json 'caption' holds a {type(caption).__name__}, expected a string or a list of strings")
