"""The neighbours stage's vocabulary: its name, its error, its slots (one set of neighbour lists per CLIP-role model
and per reference, told apart in the table by their spec columns) and the check that there are enough images for
``k``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from clipaudit.errors import ClipauditError
from clipaudit.io.tables import sql_string
from clipaudit.records import CLIP_MODEL, REFERENCE_MODEL

if TYPE_CHECKING:
    from clipaudit.config import Config

STAGE = "neighbours"


class NeighboursError(ClipauditError, RuntimeError):
    """The neighbours cannot be computed as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Slot:
    """One set of neighbour lists: a CLIP-role model (``clip_model`` its spec as written in the config) or a
    reference (``reference_model`` its spec). ``name`` (``clip``, ``clip_2``, ..., ``reference``, ``reference_2``,
    ...) names it in the stats."""

    name: str
    role: str
    clip_model: str = ""
    reference_model: str = ""

    @property
    def spec(self) -> str:
        """The model's spec as written in the config."""
        return self.clip_model if self.role == "clip" else self.reference_model

    def where(self) -> str:
        """The SQL predicate selecting this slot's rows of ``neighbours``."""
        return (f"model = {sql_string(self.role)} AND {CLIP_MODEL} = {sql_string(self.clip_model)} AND "
                f"{REFERENCE_MODEL} = {sql_string(self.reference_model)}")


def slots_of(config: Config) -> list[Slot]:
    """The slots of a run: every CLIP-role model in config order, then every reference."""
    clip = [Slot(name, "clip", clip_model=spec) for name, spec in config.models.clip_slots.items()]
    return [*clip, *(Slot(name, "reference", reference_model=spec)
                     for name, spec in config.models.reference_slots.items())]


def check_size(n: int, k: int) -> None:
    """NeighboursError unless there are images and ``k`` is smaller than their number ``n``."""
    if n == 0:
        raise NeighboursError("no image is embedded by every model (the clip models and the reference): run embed "
                              "first (with every model) on the same samples")
    if k >= n:
        raise NeighboursError(f"neighbours.k={k} must be smaller than N={n}, the number of images embedded "
                              "by every model (each image's own vector is excluded)")
