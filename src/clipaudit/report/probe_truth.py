"""The ``probe`` section of ``summary.json``: a run's findings on probe scenes checked against their truth.

When the corpus holds probe scenes (``samples.label`` is a scene, as the ``synthetic`` format writes it), every
flagged pair can be checked (:mod:`clipaudit.probe.truth`): the CLIP-blind pairs, and each DAF case with its
CLIP-only neighbours (the reference-only neighbours are shown beside them as the contrast). The section gives,
per attribute, the share of flagged pairs that differ only in it and the chance level of that share. When the
CLIP is ``probe-clip`` its card says which attribute it was trained to miss (``hidden``), and the headline is
the precision of the findings for that attribute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from clipaudit.models import packaged
from clipaudit.probe.scenes import SceneSpec
from clipaudit.probe.truth import SCENE_ATTRIBUTES, chance_rates, pair_truth, parse_label, precision
from clipaudit.records import BLIND_PAIRS, DAF_CASES, SAMPLES

log = logging.getLogger("clipaudit.report")


SNIFF = 100
"""Labels looked at first: a corpus none of whose first SNIFF labels is a scene is not parsed further."""


def probe_scenes(view: Any) -> dict[str, SceneSpec]:
    """Image id -> scene, for the samples that are probe scenes ({} for any other corpus)."""
    table = view.read(SAMPLES, ["image_id", "label"])
    if table is None or "label" not in table.column_names:
        return {}
    if not any(parse_label(label) for label in table.column("label").slice(0, SNIFF).to_pylist()):
        return {}
    scenes = {}
    for image_id, label in zip(table.column("image_id").to_pylist(), table.column("label").to_pylist()):
        spec = parse_label(label)
        if spec is not None:
            scenes[image_id] = spec
    return scenes


def trained_to_miss(clip_spec: str | None) -> dict[str, Any] | None:
    """What the card of a packaged CLIP says it was trained to miss (None for any other model)."""
    if clip_spec != packaged.PROBE_CLIP:
        return None
    try:
        card = packaged.read_card()
    except FileNotFoundError:
        return None
    return {"hidden": card.get("hidden"), "what": card.get("what"),
            "held_out": (card.get("held_out") or {}).get("minimal_pair_similarity")}


def _case_pairs(view: Any, column: str) -> list[tuple[str, str]]:
    if not view.tables.has_column(DAF_CASES, column):
        return []
    table = view.read(DAF_CASES, ["image_id", column])
    if table is None:
        return []
    return [(image_id, other) for image_id, others in zip(table.column("image_id").to_pylist(),
                                                          table.column(column).to_pylist())
            for other in others or []]


def _measure(pairs: Iterable[tuple[str, str]], scenes: dict[str, SceneSpec],
             chance: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pairs = list(pairs)
    return {attribute: precision(pairs, scenes, attribute, chance[attribute]).to_dict()
            for attribute in SCENE_ATTRIBUTES}


def probe_section(view: Any, clip_spec: str | None) -> dict[str, Any] | None:
    """The ``probe`` section of the summary (see the module docstring); None when the corpus has no probe scene."""
    scenes = probe_scenes(view)
    if not scenes:
        return None
    chance = {attribute: chance_rates(scenes.values(), attribute) for attribute in SCENE_ATTRIBUTES}
    blind = view.read(BLIND_PAIRS, ["image_a", "image_b"])
    blind_pairs = [] if blind is None else list(zip(blind.column("image_a").to_pylist(),
                                                    blind.column("image_b").to_pylist()))
    trained = trained_to_miss(clip_spec)
    section: dict[str, Any] = {
        "scenes": len(scenes),
        "trained_to_miss": trained,
        "blind_pairs": _measure(blind_pairs, scenes, chance) if blind is not None else None,
        "daf_clip_only": _measure(_case_pairs(view, "clip_only"), scenes, chance)
        if view.exists(DAF_CASES) else None,
        "daf_reference_only": _measure(_case_pairs(view, "reference_only"), scenes, chance)
        if view.exists(DAF_CASES) else None,
    }
    hidden = (trained or {}).get("hidden")
    if hidden in SCENE_ATTRIBUTES:
        section["headline"] = {
            "hidden": hidden,
            "blind_pairs": (section["blind_pairs"] or {}).get(hidden),
            "daf_clip_only": (section["daf_clip_only"] or {}).get(hidden),
        }
    return section


def truth_of_pairs(pairs: Iterable[tuple[str, str]], scenes: dict[str, SceneSpec]) -> dict[str, Any]:
    """``"a|b"`` -> :func:`~clipaudit.probe.truth.pair_truth` for the pairs whose images are both probe scenes."""
    out = {}
    for a, b in pairs:
        truth = pair_truth(scenes.get(a), scenes.get(b))
        if truth is not None:
            out[f"{a}|{b}"] = truth
    return out
