"""Flickr8k: ``Flickr8k.token.txt`` (``IMAGE.jpg#N<TAB>caption``) or the CSV layout (header ``image,caption``).

The layout is told from the content: a first line with a tab and a ``#`` before it is the token layout,
anything else is read as CSV (with the csv module: captions may hold commas and quotes). A CSV without a
header is accepted when its first field is an image file name.

Captions are grouped per image (token layout: ordered by ``#N``; CSV: file order). A line that cannot be
parsed (no tab, no ``#N``, an image name without an image extension such as the original's
``2258277193_586949ec62.jpg.1#0``, an empty caption) is a ``malformed`` reject with its line number. A
captioned image that is not in ``dataset.images`` is ONE ``missing_image`` reject (item: the image name,
detail: its line numbers). Images in the folder without captions are not samples; their number is logged.

``image_id`` is the file name without its extension; ``uri`` the image's absolute path (or URI).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clipaudit.io import fs
from clipaudit.io.readers.common import (
    CsvRecord,
    IngestError,
    absolute,
    clip_text,
    csv_records,
    is_image_name,
    line_span,
    list_files,
    log,
    number_list,
    numbered_lines,
    progress,
    reject,
    require,
    undecodable,
)
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig

_TOKEN_KEY = re.compile(r"^(?P<image>.+)#(?P<n>\d+)$")


@dataclass(frozen=True)
class _Entry:
    """One parsed caption line."""

    image: str
    number: int
    caption: str
    line: int


@dataclass
class _Group:
    """The captions of one image, in file order."""

    entries: list[_Entry] = field(default_factory=list)

    def captions(self, by_number: bool) -> list[str]:
        ordered = sorted(self.entries, key=lambda e: (e.number, e.line)) if by_number else self.entries
        return [e.caption for e in ordered]

    def lines(self) -> list[int]:
        return sorted(e.line for e in self.entries)


def detect_layout(lines: list[tuple[int, str | None]]) -> str:
    """``token`` or ``csv``, from the first non-blank decodable line."""
    for _, text in lines:
        if text is None or not text.strip():
            continue
        key, tab, _ = text.partition("\t")
        return "token" if tab and "#" in key else "csv"
    return "token"


def read_flickr8k(cfg: DatasetConfig) -> Iterator[Sample | Reject]:
    """Samples and rejects of a Flickr8k caption file (either layout) and its image folder."""
    captions_path = absolute(require(cfg.captions, "captions", "flickr8k"))
    images = absolute(require(cfg.images, "images", "flickr8k"))
    lines = numbered_lines(captions_path)
    layout = detect_layout(lines)
    log.info("flickr8k: reading %s (%s layout, %d lines)", captions_path, layout, len(lines))
    groups: dict[str, _Group] = {}
    parsed = _token_entries(lines, captions_path) if layout == "token" else _csv_entries(lines, captions_path)
    for item in parsed:
        if isinstance(item, Reject):
            yield item
        else:
            groups.setdefault(item.image, _Group()).entries.append(item)
    present = {entry.rel for entry in list_files(images)}
    for image, group in groups.items():
        yield _sample_or_missing(image, group, present, images, captions_path, layout == "token")
    uncaptioned = sum(1 for name in present if is_image_name(name) and name not in groups)
    if uncaptioned:
        log.info("flickr8k: %d images in %s have no caption in %s; they are not samples",
                 uncaptioned, images, captions_path)


def _sample_or_missing(image: str, group: _Group, present: set[str], images: str, source: str,
                       by_number: bool) -> Sample | Reject:
    if image not in present:
        lines = group.lines()
        word = "line" if len(lines) == 1 else "lines"
        return reject(source, image, "missing_image",
                      f"captioned on {word} {number_list(lines)} but not found in {images}")
    captions = group.captions(by_number)
    return Sample(image_id=image.rsplit(".", 1)[0], uri=fs.join(images, image), captions=captions,
                  caption=captions[0], source=source)


def _token_entries(lines: list[tuple[int, str | None]], source: str) -> Iterator[_Entry | Reject]:
    for number, text in progress(lines, "flickr8k captions", total=len(lines), unit="line"):
        if text is None:
            yield undecodable(source, number)
        elif text.strip():
            yield _token_line(number, text, source)


def _token_line(number: int, text: str, source: str) -> _Entry | Reject:
    key, tab, caption = text.partition("\t")
    shown = clip_text(text)
    if not tab:
        return _malformed(source, number, f"expected IMAGE#N<TAB>caption, found no tab: {shown!r}")
    match = _TOKEN_KEY.match(key.strip())
    if match is None:
        return _malformed(source, number, f"expected IMAGE#N before the tab, found {clip_text(key)!r}")
    image = match["image"]
    if not is_image_name(image):
        return _malformed(source, number, f"image name {image!r} does not end in an image file extension: {shown!r}")
    if not caption.strip():
        return _malformed(source, number, f"empty caption for {image}")
    return _Entry(image=image, number=int(match["n"]), caption=caption.strip(), line=number)


def _malformed(source: str, number: int, detail: str) -> Reject:
    return reject(source, f"line {number}", "malformed", detail)


def _csv_entries(lines: list[tuple[int, str | None]], source: str) -> Iterator[_Entry | Reject]:
    for number, text in lines:
        if text is None:
            yield undecodable(source, number)
    records = csv_records(progress(lines, "flickr8k captions", total=len(lines), unit="line"))
    columns: _Columns | None = None
    for record in records:
        if columns is None:
            columns = _csv_columns(record, source)
            if columns.header:
                continue
        yield _csv_entry(record, columns, source)


@dataclass(frozen=True)
class _Columns:
    """Where image and caption are in a CSV record, the header's width, and whether there is a header."""

    image: int
    caption: int
    width: int
    header: bool


def _csv_columns(record: CsvRecord, source: str) -> _Columns:
    """The columns from the header, or image and caption as the first two fields of a file without one."""
    fields = record.fields
    if fields and is_image_name(fields[0].strip()) and len(fields) >= 2:
        return _Columns(image=0, caption=1, width=2, header=False)
    names = [name.strip().lower() for name in fields]
    if "image" in names and "caption" in names:
        return _Columns(image=names.index("image"), caption=names.index("caption"), width=len(names), header=True)
    raise IngestError(
        f"{source}: cannot tell the layout: expected 'IMAGE.jpg#N<TAB>caption' lines, or CSV with a header "
        f"naming the columns image and caption; line {record.first} is {clip_text(','.join(fields))!r}"
    )


def _csv_entry(record: CsvRecord, columns: _Columns, source: str) -> _Entry | Reject:
    """One caption; an unquoted comma in a caption that is the last column is kept (extra fields rejoined)."""
    item = f"line {record.first}"
    where = line_span(record.first, record.last)
    fields = record.fields
    if record.error is not None:
        return reject(source, item, "malformed", f"{where}: not valid CSV: {record.error}")
    if record.last != record.first:
        return reject(source, item, "malformed", f"{where}: one record spans several lines (an unbalanced quote?)")
    if len(fields) <= max(columns.image, columns.caption):
        return reject(source, item, "malformed",
                      f"expected image and caption, found {clip_text(','.join(fields))!r}")
    last = columns.caption == columns.width - 1
    caption = ",".join(fields[columns.caption:]) if last else fields[columns.caption]
    image = fields[columns.image].strip()
    if not is_image_name(image):
        return reject(source, item, "malformed",
                      f"image name {clip_text(image)!r} does not end in an image file extension")
    if not caption.strip():
        return reject(source, item, "malformed", f"empty caption for {image}")
    return _Entry(image=image, number=0, caption=caption.strip(), line=record.first)
