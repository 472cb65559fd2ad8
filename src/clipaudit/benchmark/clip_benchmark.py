"""CLIP_benchmark-compatible results: ``clipaudit score ... --clip-benchmark-dir DIR``.

CLIP_benchmark (``pip install clip-benchmark``) writes one JSON per evaluation, ``{"dataset", "model",
"pretrained", "task", "metrics": {...}, "language"}``, named ``{dataset}_{pretrained}_{model}_{language}_{task}.json``,
and ``clip_benchmark build DIR --output benchmark.csv`` joins such files into one table. :func:`write_results`
writes the scores of a clipaudit benchmark in that layout, one file per (model, task), so they land in the same
table as a user's zero-shot results. The tasks and their metrics:

- ``clipaudit_pairs``: ``pair_accuracy`` (MMVP), its ``_ci95_low`` / ``_ci95_high`` and ``_n``, ``n_pairs``;
- ``clipaudit_invariance``: ``invariance_<transform>`` per transform, with interval and ``n``;
- ``clipaudit_text_pairs``: ``text_separation``, with interval, ``n_text_pairs``;
- ``clipaudit_severity`` (when scored with ``--severities``): ``pair_accuracy_<corruption>_<level>``, with interval
  and ``n``.

Each record also carries ``clipaudit_provenance`` beside ``metrics`` (when the figures hold it, as ``score``'s do):
what ran, a fallback, the weights' source, revision and SHA-256; ``clip_benchmark build`` keeps it as a column.

``dataset`` is ``clipaudit/<benchmark folder name>``; a spec becomes ``model`` and ``pretrained`` as CLIP_benchmark
names them: ``open_clip:ViT-B-32/openai`` -> ``ViT-B-32`` / ``openai``, ``hf:org/name`` -> ``org/name`` / ``hf``,
any other spec -> the spec / ``clipaudit``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from clipaudit.io import fs

LANGUAGE = "en"
PROVENANCE_KEY = "clipaudit_provenance"
"""The record's key, beside ``metrics``, for what the model ran with (``ModelScore.figures["provenance"]``)."""


def model_and_pretrained(spec: str) -> tuple[str, str]:
    """CLIP_benchmark's (model, pretrained) names of a model spec."""
    if spec.startswith("open_clip:") and "/" in spec:
        arch, _, tag = spec.removeprefix("open_clip:").partition("/")
        return arch, tag.lstrip("/") or "none"
    if spec.startswith("hf:"):
        return spec.removeprefix("hf:"), "hf"
    return spec, "clipaudit"


def _with_interval(prefix: str, figure: Mapping[str, Any]) -> dict[str, Any]:
    low, high = figure.get("ci95") or (None, None)
    return {prefix: figure.get("value"), f"{prefix}_ci95_low": low, f"{prefix}_ci95_high": high,
            f"{prefix}_n": figure.get("n")}


def task_metrics(figures: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """task -> metrics of one model's scores (``ModelScore.figures``)."""
    invariance: dict[str, Any] = {}
    for transform, figure in sorted((figures.get("invariance") or {}).items()):
        invariance.update(_with_interval(f"invariance_{transform}", figure))
    tasks: dict[str, dict[str, Any]] = {}
    severity: dict[str, Any] = {}
    for corruption, by_level in (figures.get("pair_accuracy_by_severity") or {}).items():
        for level, figure in sorted(by_level.items()):
            severity.update(_with_interval(f"pair_accuracy_{corruption}_{level}", figure))
    if severity:
        tasks["clipaudit_severity"] = severity
    return {
        **tasks,
        "clipaudit_pairs": {**_with_interval("pair_accuracy", figures["pair_accuracy"]),
                            "n_pairs": figures.get("n_pairs")},
        "clipaudit_invariance": {**invariance, "n_probes": figures.get("n_probes")},
        "clipaudit_text_pairs": {**_with_interval("text_separation", figures["text_separation"]),
                                 "n_text_pairs": figures.get("n_text_pairs")},
    }


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def result_records(bench_name: str, figures_by_spec: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, dict]]:
    """(file name, record) of every (model, task), in CLIP_benchmark's layout."""
    dataset = f"clipaudit/{bench_name}"
    out = []
    for spec, figures in figures_by_spec.items():
        model, pretrained = model_and_pretrained(spec)
        for task, metrics in task_metrics(figures).items():
            record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                      "metrics": metrics, "language": LANGUAGE}
            if figures.get("provenance") is not None:
                record[PROVENANCE_KEY] = figures["provenance"]
            name = "_".join(_safe(part) for part in (dataset, pretrained, model, LANGUAGE, task)) + ".json"
            out.append((name, record))
    return out


def write_results(out_dir: str, bench_dir: str, figures_by_spec: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Write the result files into ``out_dir`` (created when missing); returns their paths."""
    bench_name = bench_dir.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    paths = []
    for name, record in result_records(bench_name, figures_by_spec):
        path = fs.join(out_dir, name)
        fs.write_json(path, record)
        paths.append(path)
    return paths
