"""An ImageFolder tree (the ImageNet layout): ``root/<class folder>/<image files>``, captions from templates.

Each image's captions are ``dataset.templates`` filled with its class's readable name (``a photo of a
{label}.``); ``Sample.label`` is that name. ``dataset.class_names`` optionally maps folder names (such as
synset ids) to readable names, in one of these forms:

* ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca`` per line (the first name is used);
* JSON ``{"n01440764": "tench"}``;
* JSON ``imagenet_class_index.json``: ``{"0": ["n01440764", "tench"]}``.

A folder missing from the mapping keeps its own name (logged). Files below a class folder (nested folders
too) with an image extension are samples; other files are ``not_an_image_file`` rejects, files directly in
the root ``not_in_class_folder`` rejects. Hidden names (starting with ``.``, e.g. ``.DS_Store``) are skipped.
``image_id`` is ``class/filestem`` (``class/sub/filestem`` for nested folders).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from clipaudit.io import fs
from clipaudit.io.readers.common import (
    FileEntry,
    IngestError,
    absolute,
    is_image_name,
    list_files,
    log,
    progress,
    reject,
    require,
)
from clipaudit.records import Reject, Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig


def read_imagefolder(cfg: DatasetConfig) -> Iterator[Sample | Reject]:
    """Samples and rejects of an ImageFolder tree."""
    root = absolute(require(cfg.images, "images", "imagefolder"))
    templates = check_templates(cfg.templates)
    names = load_class_names(cfg.class_names) if cfg.class_names else {}
    entries = [e for e in list_files(root, recursive=True) if not _hidden(e.rel)]
    log.info("imagefolder: %d files under %s", len(entries), root)
    unnamed: set[str] = set()
    for entry in progress(entries, "imagefolder", total=len(entries), unit="file"):
        parts = entry.rel.split("/")
        if names and len(parts) > 1 and parts[0] not in names:
            unnamed.add(parts[0])
        yield _entry(entry, parts, root, names, templates)
    if unnamed:
        log.warning("imagefolder: %d class folders are not in %s and keep their folder name (e.g. %s)",
                    len(unnamed), cfg.class_names, min(unnamed))


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _entry(entry: FileEntry, parts: list[str], root: str, names: dict[str, str],
           templates: list[str]) -> Sample | Reject:
    if len(parts) == 1:
        return reject(root, entry.rel, "not_in_class_folder",
                      f"{entry.rel} lies directly in {root}; images belong in one folder per class")
    if not is_image_name(entry.rel):
        return reject(root, entry.rel, "not_an_image_file",
                      f"{entry.rel} does not have an image file extension")
    label = names.get(parts[0], parts[0])
    captions = [template.format(label=label) for template in templates]
    image_id = posixpath.splitext(entry.rel)[0]
    return Sample(image_id=image_id, uri=entry.path, captions=captions, caption=captions[0], source=root,
                  label=label)


def check_templates(templates: list[str]) -> list[str]:
    """The templates, each checked to format with ``{label}`` alone; :class:`IngestError` otherwise."""
    if not templates:
        raise IngestError("dataset.templates: at least one caption template is required")
    for template in templates:
        try:
            template.format(label="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise IngestError(f"dataset.templates: {template!r} must use only the placeholder {{label}} "
                              f"({type(exc).__name__}: {exc})") from exc
    return list(templates)


def load_class_names(path: str) -> dict[str, str]:
    """Folder name -> readable class name, from a synset mapping text file or a JSON file (see the module)."""
    try:
        text = fs.read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot read the class names: {exc}") from exc
    if text.lstrip().startswith(("{", "[")):
        return _json_names(path, text)
    return _text_names(path, text)


def _json_names(path: str, text: str) -> dict[str, str]:
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise IngestError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IngestError(f"{path}: expected a JSON object mapping folder names to class names")
    names: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str):
            names[key] = value
        elif isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value[:2]):
            names[value[0]] = value[1]
        else:
            raise IngestError(f"{path}: entry {key!r}: expected a name or [folder, name], found {value!r}")
    return names


def _text_names(path: str, text: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        name = parts[1].split(",")[0].strip() if len(parts) == 2 else ""
        if not name:
            raise IngestError(f"{path}: line {number}: expected 'FOLDER readable name[, other names]', "
                              f"found {line.strip()!r}")
        names[parts[0]] = name
    return names
