"""Which weights a model spec ran with: the spec asked for, what ran (a fallback included), where the weights came
from (a Hugging Face snapshot revision, a file path, a packaged file, seeded random weights, a vector index) and a
content hash of the weight files.

Every output that names a model (``summary.json``, the leaderboard, the report, the export, ``score``'s JSON)
carries :func:`provenance` of it, and a resumed run compares the hashes with those its run directory recorded.

Hashing is cheap where the Hugging Face cache already did it: a cached file is a link to a blob named by its
SHA-256 (Git LFS files), and that name is taken as the hash. Any other file is read once per process (kept by
path, size and modification time). A checkpoint split over several files hashes to the SHA-256 of its files'
``name:sha256`` lines, sorted.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .resolved import ResolvedModel

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content: the name of the Hugging Face cache blob it links to, else read in chunks
    (once per process for a given path, size and modification time)."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if os.path.islink(path) and _SHA256.match(name) and os.path.basename(os.path.dirname(real)) == "blobs":
        return name
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weights_sha256(files: Sequence[str]) -> str | None:
    """The content hash of a checkpoint's files (None for none): a single file's SHA-256, or the SHA-256 of the
    sorted ``name:sha256`` lines of several."""
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = sorted(f"{os.path.basename(f)}:{file_sha256(f)}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def snapshot_revision(path: str) -> str | None:
    """The commit of a Hugging Face cache snapshot a path lies in (``.../snapshots/<revision>/...``), or None."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and i > 0 and parts[i - 1].startswith(("models--", "datasets--")):
            return parts[i + 1]
    return None


def provenance(resolved: ResolvedModel) -> dict[str, Any]:
    """What ``resolved`` runs with, as plain data:

    ``requested`` (the spec asked for), ``ran`` (the spec that runs: ``tiny-clip`` after a fallback),
    ``fallback`` (whether they differ), ``random`` (random weights: findings meaningless), ``backend``,
    ``architecture``, ``source`` (a path, ``ORG/NAME``, ``random (seeded)``, ...), ``revision`` (the Hugging Face
    snapshot commit, when the weights come from the hub cache), ``weights`` (the weight files), ``weights_sha256``
    (their content hash; None where there are no files: random, a plug-in, an index)."""
    described = dict(resolved.target.describe(resolved)) if hasattr(resolved.target, "describe") else {}
    files = [str(f) for f in described.pop("files", [])]
    revision = described.pop("revision", None) or next((r for r in map(snapshot_revision, files) if r), None)
    return {
        "requested": resolved.requested_spec,
        "ran": resolved.spec,
        "fallback": resolved.spec != resolved.requested_spec,
        "random": resolved.is_random,
        "backend": described.pop("backend", type(resolved.target).__name__),
        "architecture": described.pop("architecture", None),
        "source": described.pop("source", None),
        "revision": revision,
        "weights": files,
        "weights_sha256": weights_sha256(files),
        **described,
    }
