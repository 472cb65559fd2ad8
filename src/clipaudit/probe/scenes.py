"""Probe scenes: coloured shapes with known kinds, colours, counts and positions, and the truth of each.

Counting, colour binding and spatial relations are what the paper finds CLIP confusing, so each scene is
built from exactly those attributes: a plain background and 1-4 shapes (circle, square, triangle) in one to
three groups, each group one kind and one named colour at one position (left, right, top, bottom, center),
with five captions that state them in different phrasings (``two red circles on the left and a blue square
on the right``). Scenes are deterministic in (seed, index): :func:`make_scene` gives the image and its
:class:`SceneSpec`, :func:`render_scene` draws any spec, so a test can plant two scenes that differ only by
colour, count or position. The scenes of one seed are all different.

:func:`variant` makes a *minimal pair*: the same scene with one attribute of one group changed. A corpus with
minimal pairs of every attribute (``dataset.variants``) lets the audit show which attribute a model misses
(:mod:`clipaudit.probe.truth` measures it). Drawing is PIL on the CPU: about 5,000 scenes a second at 224 px
on one core, 25,000 at 64 px.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 200, 20),
    "orange": (245, 130, 20), "purple": (130, 50, 170), "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "gray": (190, 190, 190)}
POSITIONS = ("left", "right", "top", "bottom", "center")
MAX_COUNT = 4

_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
_WORDS = dict(enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)))
_SLOTS = {1: [(0.5, 0.5)], 2: [(0.27, 0.5), (0.73, 0.5)],
          3: [(0.27, 0.27), (0.73, 0.27), (0.5, 0.73)], 4: [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]}
_SCALE = {1: 0.6, 2: 0.4, 3: 0.38, 4: 0.38}


@dataclass(frozen=True)
class ShapeGroup:
    """``count`` shapes of one ``kind`` and ``colour`` at one ``position`` of the scene."""

    kind: str
    colour: str
    position: str
    count: int = 1

    def __post_init__(self) -> None:
        _check(self.kind, KINDS, "kind")
        _check(self.colour, tuple(COLOURS), "colour")
        _check(self.position, POSITIONS, "position")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")

    def phrase(self, style: str = "article") -> str:
        """``a blue square`` / ``two red circles``; style ``word``: ``one blue square``, ``digit``: ``1 ...``."""
        noun = self.kind if self.count == 1 else self.kind + "s"
        if style == "digit":
            number = str(self.count)
        elif self.count == 1 and style == "article":
            number = "an" if self.colour[0] in "aeiou" else "a"
        else:
            number = _WORDS[self.count]
        return f"{number} {self.colour} {noun}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene: shape groups at distinct positions on a plain background of ``size`` x ``size`` pixels."""

    groups: tuple[ShapeGroup, ...]
    background: str = "white"
    size: int = 224

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("a scene needs at least one shape group")
        positions = [group.position for group in self.groups]
        if len(set(positions)) != len(positions):
            raise ValueError(f"shape groups need distinct positions, got {positions}")
        _check(self.background, tuple(BACKGROUNDS), "background")

    @property
    def total(self) -> int:
        """How many shapes the scene holds."""
        return sum(group.count for group in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """The attributes as plain data."""
        return asdict(self)

    def to_json(self) -> str:
        """The attributes as compact JSON (what ``Sample.label`` holds)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSpec:
        """The spec back from :meth:`to_dict` (or the JSON of :meth:`to_json`, parsed)."""
        groups = tuple(ShapeGroup(**group) for group in data["groups"])
        return cls(groups=groups, background=data.get("background", "white"), size=data.get("size", 224))

    def captions(self, omit: frozenset[str] = frozenset()) -> list[str]:
        """Five phrasings of the scene's counts, colours and positions.

        ``omit={"position"}`` gives phrasings that never say where anything is (the captions the probe CLIP is
        trained on: see :mod:`clipaudit.probe.train`); the groups are then named in a fixed order (kind,
        colour), so the order of the words does not give the positions away either.
        """
        unknown = set(omit) - set(OMITTABLE)
        if unknown:
            raise ValueError(f"cannot omit {sorted(unknown)} from captions (can omit: {', '.join(OMITTABLE)})")
        if "position" in omit:
            return self._captions_without_position()
        groups = self.groups
        placed = _join([f"{g.phrase()} {_WHERE[g.position]}" for g in groups])
        noun = "shape" if self.total == 1 else "shapes"
        verb = "is" if groups[0].count == 1 else "are"
        return [
            placed,
            f"{_WORDS[self.total]} {noun} on a {self.background} background: {_join([g.phrase() for g in groups])}",
            "; ".join(f"{_WHERE[g.position]}, {g.phrase()}" for g in groups),
            f"there {verb} {_join([g.phrase('word') for g in groups])}",
            f"a {self.background} picture showing "
            + _join([f"{g.phrase('digit')} {_WHERE[g.position]}" for g in groups]),
        ]

    def _captions_without_position(self) -> list[str]:
        groups = sorted(self.groups, key=lambda g: (KINDS.index(g.kind), g.colour))
        noun = "shape" if self.total == 1 else "shapes"
        verb = "is" if groups[0].count == 1 else "are"
        return [
            _join([g.phrase() for g in groups]),
            f"{_WORDS[self.total]} {noun} on a {self.background} background: {_join([g.phrase() for g in groups])}",
            f"there {verb} {_join([g.phrase('word') for g in groups])}",
            f"a {self.background} picture showing {_join([g.phrase('digit') for g in groups])}",
            f"{_join([g.phrase() for g in groups])} on {self.background}",
        ]


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(allowed)})")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_spec(seed: int, index: int) -> SceneSpec:
    """The spec of scene ``index`` of the corpus generated from ``seed`` (deterministic, no drawing).

    Scenes of one seed are distinct: a draw that repeats an earlier scene is drawn again (up to
    :data:`_MAX_REDRAWS` times), so scene ``index`` depends on the scenes before it (all cheap to compute).
    """
    specs = _SPECS.setdefault(seed, [])
    seen = _SEEN.setdefault(seed, set())
    while len(specs) <= index:
        n = len(specs)
        spec = _draw(seed, n, 0)
        for attempt in range(1, _MAX_REDRAWS):
            if spec.to_json() not in seen:
                break
            spec = _draw(seed, n, attempt)
        specs.append(spec)
        seen.add(spec.to_json())
    return specs[index]


_SPECS: dict[int, list[SceneSpec]] = {}
_SEEN: dict[int, set[str]] = {}
_MAX_REDRAWS = 100


def _draw(seed: int, index: int, attempt: int) -> SceneSpec:
    rng = random.Random(f"clipaudit-synthetic/{seed}/{index}/{attempt}")
    total = rng.randint(1, MAX_COUNT)
    n_groups = rng.randint(1, min(total, 3))
    cuts = sorted(rng.sample(range(1, total), n_groups - 1))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    positions = sorted(rng.sample(POSITIONS, n_groups), key=POSITIONS.index)
    looks = rng.sample([(kind, colour) for kind in KINDS for colour in COLOURS], n_groups)
    groups = tuple(ShapeGroup(kind=kind, colour=colour, position=position, count=count)
                   for (kind, colour), position, count in zip(looks, positions, counts))
    return SceneSpec(groups=groups, background=rng.choice(sorted(BACKGROUNDS)))


def make_scene(seed: int, index: int) -> tuple[Image.Image, SceneSpec]:
    """Scene ``index`` of the corpus generated from ``seed``: its RGB image and its spec."""
    spec = scene_spec(seed, index)
    return render_scene(spec), spec


def render_scene(spec: SceneSpec) -> Image.Image:
    """Draw a spec: each group in its third of the canvas (a 3 x 3 grid), shapes side by side or 2 x 2."""
    image = Image.new("RGB", (spec.size, spec.size), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    cell = spec.size / 3
    for group in spec.groups:
        column, row = _CELLS[group.position]
        half = cell * _SCALE[group.count] / 2
        for fx, fy in _SLOTS[group.count]:
            x, y = (column + fx) * cell, (row + fy) * cell
            _draw_shape(draw, group.kind, COLOURS[group.colour], x, y, half)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int], x: float, y: float,
                half: float) -> None:
    box = (x - half, y - half, x + half, y + half)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


ATTRIBUTES = ("kind", "colour", "count", "position")
"""The attributes of a shape group that :func:`variant` changes (one per minimal pair)."""
OMITTABLE = ("position",)
"""The attributes :meth:`SceneSpec.captions` can leave out."""


def variant(spec: SceneSpec, attribute: str, rng: random.Random) -> SceneSpec:
    """``spec`` with ``attribute`` of one of its groups changed, everything else kept (a minimal pair).

    ``position`` moves a group to a free position (or, with every position taken, swaps two groups'); ``colour``
    and ``kind`` change one group's look to one no other group has (ValueError when no group has such a look
    left); ``count`` changes one group's count.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r} (known: {', '.join(ATTRIBUTES)})")
    groups = list(spec.groups)
    if attribute in ("kind", "colour"):
        taken = {(g.kind, g.colour) for g in groups}
        values = KINDS if attribute == "kind" else tuple(COLOURS)

        def options(group: ShapeGroup) -> list[str]:
            return [v for v in values if v != getattr(group, attribute)
                    and (v if attribute == "kind" else group.kind, v if attribute == "colour" else group.colour)
                    not in taken]

        open_groups = [i for i, g in enumerate(groups) if options(g)]
        if not open_groups:
            raise ValueError(f"no {attribute} variant of {spec.to_json()}: every other {attribute} is taken")
        index = rng.choice(open_groups)
        groups[index] = replace(groups[index], **{attribute: rng.choice(options(groups[index]))})
        return replace(spec, groups=tuple(groups))
    index = rng.randrange(len(groups))
    group = groups[index]
    if attribute == "position":
        free = [p for p in POSITIONS if p not in {g.position for g in groups}]
        if free:
            groups[index] = replace(group, position=rng.choice(free))
        else:
            other = rng.choice([i for i in range(len(groups)) if i != index])
            groups[index], groups[other] = (replace(group, position=groups[other].position),
                                            replace(groups[other], position=group.position))
    else:
        groups[index] = replace(group, count=rng.choice([c for c in range(1, MAX_COUNT + 1) if c != group.count]))
    return replace(spec, groups=tuple(groups))


def corpus_spec(seed: int, index: int, variants: int = 0) -> SceneSpec:
    """Scene ``index`` of a corpus where each drawn scene is followed by ``variants`` minimal variants of it.

    Image ``index`` is variant ``index % (variants + 1)`` of the ``index // (variants + 1)``-th drawn scene;
    variant 0 is the drawn scene (the next of :func:`scene_spec` that is not already in the corpus), variant
    ``v`` changes attribute ``ATTRIBUTES[(v - 1) % 4]`` of one group (seeded by seed, scene, v and attempt: a
    variant equal to an earlier image is drawn again, up to :data:`_MAX_REDRAWS` times, then replaced by the
    next drawn scene: a few percent of the slots, where every variant of a small scene is already there), so the
    images of a corpus are all different. ``variants=0`` is the plain corpus of :func:`scene_spec`.
    """
    if variants < 0:
        raise ValueError(f"variants must be >= 0, got {variants}")
    if variants == 0:
        return scene_spec(seed, index)
    corpus = _CORPORA.setdefault((seed, variants), _Corpus())
    while len(corpus.specs) <= index:
        number = len(corpus.specs) % (variants + 1)
        spec = None
        if number:
            drawn = corpus.specs[-number]
            for attempt in range(_MAX_REDRAWS):
                rng = random.Random(f"clipaudit-synthetic-variant/{seed}/{corpus.cursor - 1}/{number}/{attempt}")
                try:
                    spec = variant(drawn, ATTRIBUTES[(number - 1) % len(ATTRIBUTES)], rng)
                except ValueError:
                    spec = None
                    break
                if _content(spec) not in corpus.seen:
                    break
        while spec is None or _content(spec) in corpus.seen:
            spec = scene_spec(seed, corpus.cursor)
            corpus.cursor += 1
        corpus.specs.append(spec)
        corpus.seen.add(_content(spec))
    return corpus.specs[index]


def _content(spec: SceneSpec) -> tuple:
    """What a scene shows, whatever the order of its groups: equal for two specs that draw the same image."""
    return spec.background, tuple(sorted((g.kind, g.colour, g.count, g.position) for g in spec.groups))


@dataclass
class _Corpus:
    """A corpus with variants as far as it has been generated: its images, what they show, the next scene."""

    specs: list[SceneSpec] = field(default_factory=list)
    seen: set[tuple] = field(default_factory=set)
    cursor: int = 0


_CORPORA: dict[tuple[int, int], _Corpus] = {}
