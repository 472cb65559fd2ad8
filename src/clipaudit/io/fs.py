"""One filesystem layer for every path clipaudit reads or writes: local paths, ``s3://``/``gs://`` (via
pyarrow.fs), ``http(s)://`` URLs (read only), and members of tar shards written as ``shard.tar::member``.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import urllib.request
from typing import Any

import pyarrow.fs as pafs

TAR_SEPARATOR = "::"
_HTTP_TIMEOUT_S = 30


def is_remote(path: str) -> bool:
    """True for URIs with a scheme (``s3://``, ``http://``...), false for local paths."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URI's scheme intact."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))


def read_bytes(uri: str) -> bytes:
    """Read a whole file: a local path, an object-store URI, an http(s) URL or a tar member (``a.tar::key.jpg``)."""
    if TAR_SEPARATOR in uri:
        shard, member = uri.split(TAR_SEPARATOR, 1)
        with tarfile.open(fileobj=_open_seekable(shard)) as tar:
            handle = tar.extractfile(member)
            if handle is None:
                raise FileNotFoundError(f"{member} is not a file in {shard}")
            return handle.read()
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri, timeout=_HTTP_TIMEOUT_S) as response:
            return response.read()
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def _open_seekable(path: str) -> Any:
    if not is_remote(path):
        return open(path, "rb")
    fs, inner = _filesystem(path)
    return fs.open_input_file(inner)


def exists(path: str) -> bool:
    """Whether a file or folder exists."""
    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    """Create a folder and its parents (a no-op where folders are implicit, as on object stores)."""
    fs, inner = _filesystem(path)
    fs.create_dir(inner, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write a binary file whole, its folder created, atomically where the filesystem allows (temp file + rename
    on local disks)."""
    fs, inner = _filesystem(path)
    parent = posixpath.dirname(inner) if is_remote(path) else os.path.dirname(inner)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{inner}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, inner)
        return
    with fs.open_output_stream(inner) as stream:
        stream.write(data)


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file as :func:`write_bytes` does."""
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    """Read a UTF-8 text file."""
    return read_bytes(path).decode("utf-8")


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> Any:
    """Read a JSON file."""
    return json.loads(read_text(path))
