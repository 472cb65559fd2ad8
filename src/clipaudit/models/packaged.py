"""Trained weights shipped in the package: ``probe-clip`` and ``probe-dino``, the demo's probe pair.

``probe-clip`` is the ``tiny-clip`` architecture (open_clip) and ``probe-dino`` the ``tiny-dino`` one
(transformers DINOv2), trained by :mod:`clipaudit.probe.train` (``make train-probe``). Their files live in
``clipaudit/models/weights/``:

- ``probe-clip.safetensors``, ``probe-dino.safetensors``: the weights. The CLIP's token embedding has 49,408 rows
  of which the probe captions use a few dozen; rows that training never changed equal the seeded initialisation
  (:func:`clipaudit.models.tiny.seeded`), so only the changed rows are stored
  (``token_embedding.weight.rows`` + ``.values``) and the rest are rebuilt bit for bit at load. Both files
  together are well under 5 MB.
- ``probe.json``: the card: the training schedule, the hidden attribute, the SHA-256 of each file, and what the
  training script measured on held-out scenes. A file whose hash differs from the card's is refused.

``$CLIPAUDIT_PROBE_WEIGHTS`` names another folder of the same layout (``clipaudit train-probe --out DIR``): the
registry resolves the file there on the driver and hands the actors its path.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

PROBE_CLIP = "probe-clip"
PROBE_DINO = "probe-dino"
PACKAGED = (PROBE_CLIP, PROBE_DINO)
ARCHITECTURE = {PROBE_CLIP: "tiny-clip", PROBE_DINO: "tiny-dino"}
CARD = "probe.json"
SPARSE = "token_embedding.weight"


WEIGHTS_ENV = "CLIPAUDIT_PROBE_WEIGHTS"
"""Names a folder written by ``clipaudit train-probe --out DIR`` to use instead of the packaged weights."""


def weights_dir() -> Path:
    """The folder of the probe weights: ``$CLIPAUDIT_PROBE_WEIGHTS`` when set, else the package's own."""
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(str(resources.files("clipaudit.models") / "weights"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(folder: Path | None = None) -> dict[str, Any]:
    """The card of the packaged pair (``probe.json``); FileNotFoundError when the weights are not there."""
    path = (folder or weights_dir()) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"no packaged probe weights: {path} is missing (run `make train-probe`)")
    return json.loads(path.read_text(encoding="utf-8"))


def weights_path(name: str, folder: Path | None = None) -> Path:
    """The weights file of ``probe-clip`` / ``probe-dino``."""
    if name not in PACKAGED:
        raise KeyError(name)
    return (folder or weights_dir()) / f"{name}.safetensors"


def checked_path(name: str, folder: Path | None = None) -> Path:
    """The weights file, after checking its SHA-256 against the card (ValueError naming both on a mismatch)."""
    path = weights_path(name, folder)
    expected = read_card(path.parent)["files"][name]["sha256"]
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"{path}: SHA-256 {actual} differs from the card's {expected}; retrain with "
                         "`make train-probe` or restore the file")
    return path


def checked_file(path: str) -> Path:
    """:func:`checked_path` of a weights file given by its path (its card is the one beside it)."""
    file = Path(path)
    return checked_path(file.name.removesuffix(".safetensors"), file.parent)


def save_state(model: Any, initial: dict[str, Any], path: Path) -> None:
    """Save ``model``'s weights; a ``token_embedding.weight`` is stored as the rows that differ from
    ``initial`` (the seeded initialisation's state dict)."""
    import torch
    from safetensors.torch import save_file

    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    if SPARSE in state:
        weight = state.pop(SPARSE)
        rows = torch.nonzero((weight != initial[SPARSE]).any(dim=1)).flatten()
        state[SPARSE + ".rows"] = rows.to(torch.int64).contiguous()
        state[SPARSE + ".values"] = weight[rows].contiguous()
    save_file(state, str(path))


def load_state(model: Any, path: Path) -> None:
    """Load weights saved by :func:`save_state` into ``model`` (built from its seeded initialisation)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if SPARSE + ".rows" in state:
        weight = model.state_dict()[SPARSE].detach().clone()
        weight[state.pop(SPARSE + ".rows")] = state.pop(SPARSE + ".values")
        state[SPARSE] = weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent_missing = [key for key in missing if key in dict(model.named_parameters())]
    if persistent_missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the architecture (missing {persistent_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    model.eval()

