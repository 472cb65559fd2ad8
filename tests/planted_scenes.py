"""A generated corpus for planted-model tests: one circle per scene, at each of five positions in each of five
colours (25 scenes, white background), written as PNGs plus a ``manifest.csv`` (``image,caption``).

The five colours fall in different bins of :mod:`planted_models`' colour histogram, so every two colour variants
of a scene share no colour; the five positions occupy different cells of its layout grid.
"""

from __future__ import annotations

import csv
from pathlib import Path

from clipaudit.probe.scenes import SceneSpec, ShapeGroup, render_scene

COLOURS = ("red", "green", "blue", "yellow", "purple")
POSITIONS = ("left", "right", "top", "bottom", "center")


def write_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """The scenes as PNGs plus a manifest; file stem -> (position, colour)."""
    truth = {}
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for position in POSITIONS:
            for colour in COLOURS:
                spec = SceneSpec((ShapeGroup("circle", colour, position, 1),), "white")
                name = f"{position}_{colour}"
                render_scene(spec).save(root / f"{name}.png")
                writer.writerow([f"{name}.png", spec.captions()[0]])
                truth[name] = (position, colour)
    return truth
