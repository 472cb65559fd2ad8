"""The report's charts, drawn by matplotlib with the Agg backend into PNG bytes (no display, no network)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

_DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=_DPI)
    _pyplot().close(figure)
    return buffer.getvalue()


def _histogram_shares(histogram: Mapping[str, int], k: int) -> list[float]:
    """``{"c/k": count}`` -> the share of images at each overlap c = 0..k."""
    counts = [int(histogram.get(f"{c}/{k}", 0)) for c in range(k + 1)]
    total = sum(counts) or 1
    return [count / total for count in counts]


def overlap_chart(histogram: Mapping[str, int], k: int, chance: float | None, mean: float | None,
                  null_histogram: Mapping[str, int] | None = None) -> bytes:
    """Bars: the share of images per overlap@k; the permutation null's distribution beside them; vertical lines at
    the chance level (``k / (N - 1)`` of the neighbours shared by two random lists) and at the corpus mean."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.0, 3.2))
    xs = [c / k for c in range(k + 1)]
    width = 0.8 / k / (2 if null_histogram else 1)
    observed = _histogram_shares(histogram, k)
    offset = width / 2 if null_histogram else 0.0
    axes.bar([x - offset for x in xs], observed, width=width, color="#2256c9", label="CLIP vs reference")
    if null_histogram:
        axes.bar([x + offset for x in xs], _histogram_shares(null_histogram, k), width=width, color="#b0b0b8",
                 label="permutation null")
    if chance is not None:
        axes.axvline(chance, color="#d9480f", linestyle="--", linewidth=1.5, label=f"chance {chance:.3f}")
    if mean is not None:
        axes.axvline(mean, color="#1c7c54", linewidth=1.5, label=f"mean {mean:.3f}")
    axes.set_xlabel(f"overlap@{k} (shared neighbours / {k})")
    axes.set_ylabel("share of images")
    axes.set_xlim(-0.06, 1.06)
    axes.legend(fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def transform_chart(transforms: Sequence[str], mean_changed: Sequence[float | None],
                    top1_share: Sequence[float | None], top_k: int | None = None) -> bytes:
    """Two panels per transform: the mean number of top-k captions that changed, and the share of images whose
    top-1 caption changed."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    ys = list(range(len(transforms)))
    left.barh(ys, [v or 0.0 for v in mean_changed], color="#2256c9")
    left.set_yticks(ys, transforms)
    left.invert_yaxis()
    left.set_xlabel(f"mean captions changed in the top {top_k}" if top_k else "mean captions changed")
    if top_k:
        left.set_xlim(0, top_k)
    right.barh(ys, [v or 0.0 for v in top1_share], color="#d9480f")
    right.set_yticks(ys, transforms)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("share of images whose top-1 caption changed")
    for axes in (left, right):
        axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def support_chart(names: Sequence[str], support: Sequence[int], success: Sequence[float | None]) -> bytes:
    """Failure types: support (cases that showed them) as bars, with the validation success rate as a label."""
    plt = _pyplot()
    height = max(1.8, 0.32 * len(names) + 0.8)
    figure, axes = plt.subplots(figsize=(7.0, height))
    ys = list(range(len(names)))
    axes.barh(ys, support, color="#6741d9")
    labels = [(name if len(name) <= 48 else name[:47] + "\u2026").replace("$", r"\$") for name in names]
    axes.set_yticks(ys, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("support (cases)")
    for y, value, rate in zip(ys, support, success):
        if rate is not None:
            axes.text(value, y, f"  {100 * rate:.0f} % confirmed", va="center", fontsize=7)
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def model_bars(names: Sequence[str], values: Sequence[float | None], label: str,
               share: bool = False) -> bytes:
    """One horizontal bar per CLIP-role model (a leaderboard measure; a missing value is drawn as no bar and
    labelled ``n/a``); ``share``: the axis runs from 0 to 1."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.6, max(1.5, 0.34 * len(names) + 1.0)))
    ys = list(range(len(names)))
    axes.barh(ys, [v or 0.0 for v in values], color="#2256c9")
    labels = [(name if len(name) <= 36 else "\u2026" + name[-35:]).replace("$", r"\$") for name in names]
    axes.set_yticks(ys, labels, fontsize=8)
    axes.invert_yaxis()
    if share:
        axes.set_xlim(0, 1)
    for y, value in zip(ys, values):
        axes.text(value or 0.0, y, "  n/a" if value is None else f"  {value:.3f}", va="center", fontsize=7)
    axes.set_xlabel(label, fontsize=9)
    axes.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def severity_chart(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], label: str,
                   share: bool = False, top: float | None = None) -> bytes:
    """Severity curves: one panel per corruption, the figure against the severity level (1 mild to 5 severe), one
    line per model (``curves``: model -> corruption -> (level, value) points)."""
    plt = _pyplot()
    corruptions = list(dict.fromkeys(c for per_model in curves.values() for c in per_model))
    figure, panels = plt.subplots(1, max(1, len(corruptions)), figsize=(2.3 * max(1, len(corruptions)) + 0.6, 2.8),
                                  sharey=True, squeeze=False)
    for axes, corruption in zip(panels[0], corruptions):
        for model, per_model in curves.items():
            points = per_model.get(corruption) or []
            if points:
                name = (model if len(model) <= 30 else "\u2026" + model[-29:]).replace("$", r"\$")
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1.5, label=name)
        axes.set_title(corruption.replace("_", " "), fontsize=9)
        axes.set_xlabel("severity", fontsize=8)
        axes.set_xticks([1, 2, 3, 4, 5])
        axes.set_xlim(0.6, 5.4)
        if share:
            axes.set_ylim(0, 1)
        elif top is not None:
            axes.set_ylim(0, top)
        axes.spines[["top", "right"]].set_visible(False)
    panels[0][0].set_ylabel(label, fontsize=8)
    if len(curves) > 1:
        panels[0][-1].legend(fontsize=7, frameon=False)
    return _png(figure)
