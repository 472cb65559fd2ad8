"""Finding a dataset repo in the local Hugging Face hub cache, as ``huggingface_hub`` lays it out; nothing is
downloaded."""

from __future__ import annotations

import os


def hub_cache() -> str:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(repo: str) -> str | None:
    """The newest snapshot folder of dataset repo ``ORG/NAME`` in the hub cache, or None."""
    folder = os.path.join(hub_cache(), "datasets--" + repo.replace("/", "--"), "snapshots")
    if not os.path.isdir(folder):
        return None
    snapshots = sorted((os.path.getmtime(os.path.join(folder, s)), s) for s in os.listdir(folder))
    return os.path.join(folder, snapshots[-1][1]) if snapshots else None
