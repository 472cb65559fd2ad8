"""Findings measured against the truth of probe scenes: is what the audit found the attribute the model misses?

Every probe image carries its :class:`~clipaudit.probe.scenes.SceneSpec` (``samples.label``), so for any pair of
images the attributes that differ are known. Two measures, for a set of pairs the audit flagged (CLIP-blind
pairs; a DAF case with each of its CLIP-only neighbours):

- **only**: the share of flagged pairs whose images differ *only* in the attribute (``two red circles on the
  left`` vs ``two red circles on the right``): the pair isolates the attribute. Chance: the same share over
  every pair of the corpus (exact, by counting).
- **differs**: the share whose images differ in the attribute at all (possibly in others too). Chance: the same
  share over every pair of the corpus.

``precision / chance`` (the lift) is what says the finding is real: a model blind to position has blind pairs
that are mostly position-only pairs, while such pairs are rare in the corpus.

One ambiguity is inherent: two groups of the same kind and count that swap positions are equally two groups
that swap colours; :func:`only_differs_in` then names the first attribute in :data:`SCENE_ATTRIBUTES` order.
:func:`~clipaudit.probe.scenes.variant` only swaps when every position is taken, which drawn scenes never have.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clipaudit.probe.scenes import ATTRIBUTES, SceneSpec

SCENE_ATTRIBUTES = (*ATTRIBUTES, "background")
"""Every attribute a pair of scenes can differ in."""


def parse_label(label: str | None) -> SceneSpec | None:
    """The scene of a ``samples.label`` (None when the label is not a probe scene's)."""
    if not label:
        return None
    try:
        return SceneSpec.from_dict(json.loads(label))
    except (ValueError, KeyError, TypeError):
        return None


def _groups(spec: SceneSpec, drop: str | None) -> tuple:
    fields = [f for f in ATTRIBUTES if f != drop]
    return tuple(sorted(tuple(getattr(g, f) for f in fields) for g in spec.groups))


def without(spec: SceneSpec, attribute: str) -> tuple:
    """The scene with ``attribute`` forgotten: equal for two scenes that differ at most in it."""
    background = None if attribute == "background" else spec.background
    return background, _groups(spec, attribute if attribute != "background" else None)


def projection(spec: SceneSpec, attribute: str) -> tuple:
    """Only ``attribute`` of the scene (the background, or the sorted values of the groups)."""
    if attribute == "background":
        return (spec.background,)
    return tuple(sorted(getattr(g, attribute) for g in spec.groups))


def full(spec: SceneSpec) -> tuple:
    """The whole scene, order of the groups aside."""
    return spec.background, _groups(spec, None)


def only_differs_in(a: SceneSpec, b: SceneSpec) -> str | None:
    """The one attribute two different scenes differ in, or None (equal scenes, or several attributes)."""
    if full(a) == full(b):
        return None
    for attribute in SCENE_ATTRIBUTES:
        if without(a, attribute) == without(b, attribute):
            return attribute
    return None


def differs_in(a: SceneSpec, b: SceneSpec, attribute: str) -> bool:
    """Whether the scenes differ in ``attribute``: its values differ, or the scenes differ in nothing else (two
    groups that swapped positions have the same set of positions, and differ only in position)."""
    return projection(a, attribute) != projection(b, attribute) or only_differs_in(a, b) == attribute


def _pairs_within(counts: Iterable[int]) -> int:
    return sum(n * (n - 1) // 2 for n in counts)


def chance_rates(specs: Iterable[SceneSpec], attribute: str) -> dict[str, float | None]:
    """The ``only`` and ``differs`` shares over every pair of the corpus, counted exactly in O(N)."""
    specs = list(specs)
    total = _pairs_within([len(specs)])
    if total == 0:
        return {"only": None, "differs": None, "pairs": 0}
    same_full = _pairs_within(Counter(full(s) for s in specs).values())
    same_without = _pairs_within(Counter(without(s, attribute) for s in specs).values())
    only = same_without - same_full
    same_projection = _pairs_within(Counter(projection(s, attribute) for s in specs).values())
    same_both = _pairs_within(Counter((without(s, attribute), projection(s, attribute)) for s in specs).values())
    differs = (total - same_projection) + (same_both - same_full)
    return {"only": only / total, "differs": differs / total, "pairs": total}


@dataclass(frozen=True)
class Precision:
    """How many flagged pairs isolate (``only``) or involve (``differs``) the attribute, against chance."""

    attribute: str
    pairs: int
    """Flagged pairs whose two images are both probe scenes."""
    only: float | None
    differs: float | None
    chance_only: float | None
    chance_differs: float | None
    by_attribute: dict[str, int]
    """Flagged pairs per attribute they differ only in (``several`` for the rest)."""

    @property
    def lift(self) -> float | None:
        """``only`` over its chance level."""
        if self.only is None or not self.chance_only:
            return None
        return self.only / self.chance_only

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``summary.json``."""
        return {"attribute": self.attribute, "pairs": self.pairs, "only": self.only, "differs": self.differs,
                "chance_only": self.chance_only, "chance_differs": self.chance_differs, "lift": self.lift,
                "by_attribute": self.by_attribute}


def precision(pairs: Iterable[tuple[str, str]], scenes: Mapping[str, SceneSpec], attribute: str,
              chance: Mapping[str, float | None]) -> Precision:
    """Measure flagged ``pairs`` (image ids) against ``scenes`` (image id -> its scene); pairs with an image
    that is not a probe scene are left out."""
    if attribute not in SCENE_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r} (known: {', '.join(SCENE_ATTRIBUTES)})")
    counted = only = differs = 0
    by_attribute: Counter[str] = Counter()
    for a, b in pairs:
        sa, sb = scenes.get(a), scenes.get(b)
        if sa is None or sb is None:
            continue
        counted += 1
        alone = only_differs_in(sa, sb)
        by_attribute[alone or "several"] += 1
        only += alone == attribute
        differs += differs_in(sa, sb, attribute)
    return Precision(attribute, counted, only / counted if counted else None,
                     differs / counted if counted else None, chance.get("only"), chance.get("differs"),
                     dict(by_attribute.most_common()))


def pair_truth(a: SceneSpec | None, b: SceneSpec | None) -> dict[str, Any] | None:
    """What the report shows beside an evidence pair: each scene's first caption and what differs."""
    if a is None or b is None:
        return None
    differing = [attribute for attribute in SCENE_ATTRIBUTES if differs_in(a, b, attribute)]
    return {"a": a.captions()[0], "b": b.captions()[0], "only": only_differs_in(a, b), "differs": differing}
