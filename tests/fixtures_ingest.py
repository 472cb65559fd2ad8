"""Generated fixtures for the ingest tests: tiny distinct images, caption files, tar shards, configs."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from clipaudit.config import Config, DatasetConfig
from clipaudit.records import Reject, Sample


def image_bytes(n: int, fmt: str = "PNG") -> bytes:
    """A 4x4 solid image whose colour (and so whose bytes) differs for every ``n`` in 0..255."""
    colour = (n * 37 % 256, n * 91 % 256, n * 53 % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, n: int) -> Path:
    """Write image ``n`` (JPEG or PNG from the extension) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(n, fmt))
    return path


def write_images(folder: Path, names: Iterable[str]) -> list[Path]:
    """Write distinct images with these names into ``folder``."""
    return [write_image(folder / name, n) for n, name in enumerate(names)]


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """Write text lines (UTF-8, one per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """Write an uncompressed tar holding ``members`` (name -> bytes) in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def split(items: Iterable[Sample | Reject]) -> tuple[list[Sample], list[Reject]]:
    """(samples, rejects) of a reader's stream."""
    samples: list[Sample] = []
    rejects: list[Reject] = []
    for item in items:
        (samples if isinstance(item, Sample) else rejects).append(item)
    return samples, rejects


def by_reason(rejects: Iterable[Reject]) -> dict[str, list[Reject]]:
    """Rejects grouped by reason."""
    groups: dict[str, list[Reject]] = {}
    for item in rejects:
        groups.setdefault(item.reason, []).append(item)
    return groups


def make_config(run_dir: Path, **dataset: object) -> Config:
    """A Config over ``run_dir`` with these dataset fields (paths as strings)."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in dataset.items()}
    return Config(run_dir=str(run_dir), dataset=DatasetConfig(**values))
