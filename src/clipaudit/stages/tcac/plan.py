"""What the tcac stage still has to do, planned from the tables: the configured transforms each image lacks in
``tcac_cases`` (images rejected by the embed or tcac stage left out), once the finished rows are checked to be of
the same model and settings; and the stage's name and error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.records import REJECTS, TCAC_CASES
from clipaudit.stages.tcac.settings import settings_for

if TYPE_CHECKING:
    from clipaudit.config import TcacConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import Preprocess, ResolvedModel

STAGE = "tcac"


class TcacError(ClipauditError, RuntimeError):
    """The tcac stage cannot run as configured (the message says why and what to do)."""


def _check_existing(existing: pa.Table | None, spec: str, tcac: TcacConfig, preprocess: Preprocess,
                    uri: str) -> set[tuple[str, str]]:
    """The finished (image_id, transform) pairs; TcacError when they were made by another model or settings."""
    if existing is None or existing.num_rows == 0:
        return set()
    models = set(pc.unique(existing.column("model")).to_pylist())
    if models != {spec}:
        raise TcacError(f"{TCAC_CASES} in {uri} holds rows of {sorted(models)}, but the CLIP model is {spec!r}: "
                        "use a new run_dir for a different model")
    transforms = existing.column("transform").to_pylist()
    settings = existing.column("settings").to_pylist()
    for transform in sorted(set(transforms) & set(tcac.transforms)):
        found = {s for t, s in zip(transforms, settings) if t == transform}
        wanted = settings_for(tcac, transform, preprocess)
        if found != {wanted}:
            raise TcacError(f"{TCAC_CASES} in {uri} holds {transform!r} rows made with {sorted(found)[0]}, but "
                            f"the config now gives {wanted}: use a new run_dir for different tcac settings")
    return set(zip(existing.column("image_id").to_pylist(), transforms))


def plan_pairs(tables: RunTables, samples: pa.Table, tcac: TcacConfig, model: ResolvedModel) -> dict[str, list[str]]:
    """image_id -> the configured transforms it still lacks in ``tcac_cases`` (images rejected by the embed or
    tcac stage are left out), in image_id order."""
    existing = tables.read(TCAC_CASES, ["image_id", "transform", "model", "settings"])
    done = _check_existing(existing, model.spec, tcac, model.preprocess, tables.uri)
    rejected = tables.read(REJECTS, ["item"], where=f"stage = 'embed' OR stage = '{STAGE}'")
    skip = set(rejected.column("item").to_pylist()) if rejected is not None else set()
    todo: dict[str, list[str]] = {}
    for image_id in sorted(samples.column("image_id").to_pylist()):
        if image_id in skip:
            continue
        missing = [t for t in tcac.transforms if (image_id, t) not in done]
        if missing:
            todo[image_id] = missing
    return todo
