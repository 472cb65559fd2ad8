"""What every corpus reader shares: the ingest stage's reject rows, config checks, file listing and opening
(local or object store), progress bars, numbered text lines and CSV records with their line numbers."""

from __future__ import annotations

import csv
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import pyarrow.fs as pafs
from tqdm import tqdm

from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.records import Reject

if TYPE_CHECKING:
    pass

log = logging.getLogger("clipaudit.ingest")

STAGE = "ingest"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File extensions (lower case) taken as images."""

T = TypeVar("T")


class IngestError(ClipauditError, ValueError):
    """The corpus cannot be read as configured (a missing column, an unknown layout); the message names the file."""


@dataclass(frozen=True)
class FileEntry:
    """One file found under a folder: its full path or URI, its path relative to the folder (``/``), its size."""

    path: str
    rel: str
    size: int


def reject(source: str, item: str, reason: str, detail: str) -> Reject:
    """A reject of the ingest stage."""
    return Reject(source=source, item=item, stage=STAGE, reason=reason, detail=detail)


def require(value: str | None, key: str, fmt: str) -> str:
    """``value``, or an :class:`IngestError` saying that ``dataset.<key>`` is needed for ``fmt``."""
    if not value:
        raise IngestError(f"dataset.{key} is required for format {fmt}")
    return value


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def absolute(path: str) -> str:
    """A local path made absolute; a URI unchanged."""
    return path if fs.is_remote(path) else os.path.abspath(path)


def basename(path: str) -> str:
    """The last component of a local path or URI."""
    return posixpath.basename(path.rstrip("/")) if fs.is_remote(path) else os.path.basename(path.rstrip(os.sep))


def dirname(path: str) -> str:
    """The folder of a local path or URI."""
    return posixpath.dirname(path) if fs.is_remote(path) else os.path.dirname(os.path.abspath(path))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns an inner path back into a URI)."""
    if fs.is_remote(path):
        filesystem, inner = pafs.FileSystem.from_uri(path)
        return filesystem, inner, path.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://")), ""


def list_files(folder: str, recursive: bool = False) -> list[FileEntry]:
    """Files under ``folder`` (sorted by relative path); raises :class:`IngestError` if it is not a folder."""
    filesystem, inner, prefix = _filesystem(folder)
    info = filesystem.get_file_info(inner)
    if info.type != pafs.FileType.Directory:
        raise IngestError(f"{folder}: not a folder")
    selector = pafs.FileSelector(inner, recursive=recursive)
    entries = []
    root = inner.rstrip("/") + "/"
    for item in filesystem.get_file_info(selector):
        if item.type != pafs.FileType.File:
            continue
        rel = item.path.replace(os.sep, "/")[len(root.replace(os.sep, "/")):]
        path = prefix + item.path if prefix else item.path
        entries.append(FileEntry(path=path, rel=rel, size=int(item.size or 0)))
    return sorted(entries, key=lambda e: e.rel)


def open_binary(path: str) -> BinaryIO:
    """A seekable binary handle on a local file or object-store object (close it, or use ``with``)."""
    if not fs.is_remote(path):
        return open(path.removeprefix("file://"), "rb")
    filesystem, inner, _ = _filesystem(path)
    return filesystem.open_input_file(inner)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar over ``items`` on a terminal, nothing elsewhere."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False))


def numbered_lines(path: str) -> list[tuple[int, str | None]]:
    """The lines of a text file as (line number from 1, text without line end, or None if not valid UTF-8).

    A UTF-8 byte-order mark is dropped; a final empty line (after the last newline) is not returned.
    """
    data = fs.read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines: list[tuple[int, str | None]] = []
    for number, line in enumerate(raw, start=1):
        try:
            lines.append((number, line.rstrip(b"\r").decode("utf-8")))
        except UnicodeDecodeError:
            lines.append((number, None))
    return lines


def undecodable(source: str, number: int) -> Reject:
    """The reject for a line that is not valid UTF-8."""
    return reject(source, f"line {number}", "malformed", "the line is not valid UTF-8")


@dataclass(frozen=True)
class CsvRecord:
    """One CSV record: the physical lines it spans and its fields (``error`` set when the csv module failed)."""

    first: int
    last: int
    fields: list[str]
    error: str | None = None


def csv_records(lines: Iterable[tuple[int, str | None]], delimiter: str = ",") -> Iterator[CsvRecord]:
    """Parse decoded lines with the csv module, keeping each record's line numbers; blank records are skipped.

    Undecodable lines (None) are not fed to the parser (report them with :func:`undecodable`).
    """
    span: dict[str, int | None] = {"first": None, "last": None}

    def feed() -> Iterator[str]:
        for number, text in lines:
            if text is None:
                continue
            if span["first"] is None:
                span["first"] = number
            span["last"] = number
            yield text + "\n"

    reader = csv.reader(feed(), delimiter=delimiter)
    while True:
        span["first"] = None
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            first = span["first"] or 0
            yield CsvRecord(first, span["last"] or first, [], error=str(exc))
            continue
        if any(field.strip() for field in fields):
            first = span["first"] or 0
            yield CsvRecord(first, span["last"] or first, fields)


def line_span(first: int, last: int) -> str:
    """``line 7`` or ``lines 7-9``."""
    return f"line {first}" if first == last else f"lines {first}-{last}"


def number_list(numbers: list[int], limit: int = 10) -> str:
    """``3, 4, 5`` (at most ``limit`` numbers, then ``and N more``)."""
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown if len(numbers) <= limit else f"{shown} and {len(numbers) - limit} more"


def clip_text(text: str, width: int = 120) -> str:
    """``text`` shortened to ``width`` characters for a reject detail."""
    return text if len(text) <= width else text[: width - 3] + "..."
