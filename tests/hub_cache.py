"""A fake Hugging Face hub cache: a folder of saved files laid out as ``huggingface_hub`` lays out a download
(``models--ORG--NAME/refs/main``, ``snapshots/<revision>/<file>`` links into ``blobs/<sha256>``), so the real
loading code finds it offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_repo(cache: Path, repo_id: str, files: Path, revision: str | None = None) -> Path:
    """Put every file under ``files`` into ``cache`` as repo ``repo_id`` at ``revision`` (default: a hash of the
    repo id); returns the snapshot folder."""
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot
