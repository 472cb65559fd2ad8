"""``clipaudit score BENCH_DIR --model SPEC ...``: any image-text model on a benchmark folder.

For each model: pair accuracy (MMVP: a pair counts only if each image is closer to its own caption than to the
other's), the invariance rate per transform (the own caption's rank in the probe's pool does not worsen once the
image is transformed), and the text-pair separation rate (the text tower keeps a failure type's caption pair below
the threshold recorded with it), each with a bootstrap 95% interval (:mod:`clipaudit.benchmark.metrics`). With
``severities``, pair accuracy again with both images of every pair degraded by each graded corruption at each of
those levels (:mod:`clipaudit.transforms.severities`; seeded per image, at the image's own size).

Images and texts are embedded through the runner (:mod:`clipaudit.runtime`: Ray actor pools like the embed stage,
or in-process with ``runner="local"``) with the embed stage's batch functions. Transformed images are re-created
once, before any model runs, from the recorded parameters with the report's helper
(:func:`clipaudit.report.images.recreate_transformed`, i.e. :func:`clipaudit.transforms.apply_params`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipaudit.benchmark.format import (
    INVARIANCE,
    INVARIANCE_SCHEMA,
    PAIRS,
    PAIRS_SCHEMA,
    TEXT_PAIRS,
    TEXT_PAIRS_SCHEMA,
    BenchmarkError,
    read_manifest,
    read_table,
    resolve_file,
)
from clipaudit.benchmark.metrics import own_rank, pair_correct, rate, separated
from clipaudit.config import Config, EmbedConfig, RayConfig
from clipaudit.errors import ClipauditError
from clipaudit.records import OK

log = logging.getLogger("clipaudit.benchmark")
ORIGINAL = "image:"
TRANSFORMED = "probe:"
CORRUPTED = "graded:"
SEVERITY_SEED = 0
"""The seed of the corruptions' random draws (the noise): fixed, so every model sees the same pixels."""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark folder read back: its manifest and its three tables as rows."""

    path: str
    manifest: dict[str, Any]
    pairs: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    text_pairs: list[dict[str, Any]]


def load_benchmark(bench_dir: str) -> Benchmark:
    """Read a benchmark folder (its format version checked, see :func:`~clipaudit.benchmark.format.read_manifest`)."""
    manifest = read_manifest(bench_dir)
    return Benchmark(bench_dir, manifest, read_table(bench_dir, PAIRS, PAIRS_SCHEMA).to_pylist(),
                     read_table(bench_dir, INVARIANCE, INVARIANCE_SCHEMA).to_pylist(),
                     read_table(bench_dir, TEXT_PAIRS, TEXT_PAIRS_SCHEMA).to_pylist())


@dataclass
class ModelScore:
    """One model's outcome per item (in the benchmark's row order) and the figures made of them."""

    spec: str
    pair_correct: np.ndarray
    invariant: np.ndarray
    separated: np.ndarray
    figures: dict[str, Any] = field(default_factory=dict)


def resolve_scored(spec: str) -> Any:
    """Resolve ``spec`` as an image-text model; a clear :class:`BenchmarkError` when it cannot be resolved or has
    no text tower (a ``python:`` plug-in is built once here to check its interface)."""
    from clipaudit.models import plugin, resolve_model

    try:
        resolved = resolve_model(spec, "clip")
        if isinstance(resolved.target, plugin.PluginTarget):
            plugin.load(resolved, resolved.target, "cpu")
    except ClipauditError as exc:
        raise BenchmarkError(f"--model {spec}: cannot be scored: {exc} (scoring needs an image tower and a text "
                             "tower)") from exc
    if resolved.is_random:
        log.warning("%s has random weights: its scores are meaningless", resolved.spec)
    return resolved


def transformed_images(bench: Benchmark, folder: str, max_pixels: int) -> dict[str, str]:
    """Re-create every probe's transformed image from its recorded parameters into ``folder`` (lossless PNG);
    probe_id -> path."""
    from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes
    from clipaudit.transforms import TransformParams, input_from, recreate_transformed, transform_params_from

    defaults = TransformParams()
    out: dict[str, str] = {}
    for index, probe in enumerate(bench.probes):
        uri = resolve_file(bench.path, probe["file"])
        try:
            image = decode_image(read_image_bytes(uri), max_pixels)
        except ImageRejected as exc:
            raise BenchmarkError(f"probe {probe['probe_id']}: cannot read {uri}: {exc}") from exc
        params = transform_params_from(probe["transform"], probe["settings"], defaults)
        picture = recreate_transformed(image, probe["transform"], probe["params"], params,
                                       input_from(probe["settings"]))
        path = os.path.join(folder, f"{index:06d}.png")
        picture.save(path, format="PNG")
        out[probe["probe_id"]] = path
    return out


def corrupted_images(bench: Benchmark, folder: str, max_pixels: int, names: Sequence[str]) -> dict[str, str]:
    """Degrade every image of a pair by each graded transform of ``names`` into ``folder`` (lossless PNG);
    ``CORRUPTED + name + "|" + image_id`` -> path."""
    from clipaudit.io.images import ImageRejected, decode_image, read_image_bytes
    from clipaudit.transforms import TransformParams, transform_image

    files = {p[f"image_{side}"]: p[f"file_{side}"] for p in bench.pairs for side in ("a", "b")}
    out: dict[str, str] = {}
    for index, (image_id, file) in enumerate(sorted(files.items())):
        uri = resolve_file(bench.path, file)
        try:
            image = decode_image(read_image_bytes(uri), max_pixels)
        except ImageRejected as exc:
            raise BenchmarkError(f"pair image {image_id}: cannot read {uri}: {exc}") from exc
        for number, name in enumerate(names):
            picture, _ = transform_image(image, name, TransformParams(), SEVERITY_SEED, image_id)
            path = os.path.join(folder, f"graded-{index:06d}-{number:02d}.png")
            picture.save(path, format="PNG")
            out[f"{CORRUPTED}{name}|{image_id}"] = path
    return out


def graded_names(levels: Sequence[int]) -> list[str]:
    """Every corruption at each of ``levels`` (BenchmarkError for a level that is not 1 to 5)."""
    from clipaudit.transforms import CORRUPTION_NAMES, LEVELS, expand

    bad = [level for level in levels if level not in LEVELS]
    if bad:
        raise BenchmarkError(f"--severities: levels are {', '.join(map(str, LEVELS))}, got {bad[0]!r}")
    return expand(CORRUPTION_NAMES, sorted(set(levels)))


def image_work(bench: Benchmark, transformed: dict[str, str]) -> pa.Table:
    """The images to embed (originals of pairs and probes, then transformed probes and degraded pair images):
    image_id, uri, need_clip."""
    uris: dict[str, str] = {}
    for pair in bench.pairs:
        uris[ORIGINAL + pair["image_a"]] = resolve_file(bench.path, pair["file_a"])
        uris[ORIGINAL + pair["image_b"]] = resolve_file(bench.path, pair["file_b"])
    for probe in bench.probes:
        uris[ORIGINAL + probe["image_id"]] = resolve_file(bench.path, probe["file"])
    uris.update({key if key.startswith(CORRUPTED) else TRANSFORMED + key: path for key, path in transformed.items()})
    ids = sorted(uris)
    return pa.table({"image_id": ids, "uri": [uris[i] for i in ids], "need_clip": [True] * len(ids)})


def texts_of(bench: Benchmark) -> list[str]:
    """Every text the benchmark needs encoded, each once, sorted."""
    texts = {t for pair in bench.pairs for t in (pair["caption_a"], pair["caption_b"])}
    texts |= {t for probe in bench.probes for t in probe["pool"] or []}
    texts |= {t for pair in bench.text_pairs for t in (pair["caption_a"], pair["caption_b"])}
    return sorted(t for t in texts if t is not None)


def embed_model(runner: Any, model: Any, images: pa.Table, texts: list[str],
                embed: EmbedConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Unit image vectors by image id and unit text vectors by text, through the runner."""
    image_vectors: dict[str, np.ndarray] = {}
    if images.num_rows:
        for batch in runner.map_images(images, {"clip": model}, embed):
            for i, image_id in enumerate(batch["image_id"]):
                if batch["status"][i] != OK:
                    raise BenchmarkError(f"{model.spec}: cannot embed {batch['uri'][i]}: {batch['detail'][i]}")
                image_vectors[str(image_id)] = np.asarray(batch["vector_clip"][i], dtype=np.float32)
    text_vectors: dict[str, np.ndarray] = {}
    if texts:
        for batch in runner.map_texts(pa.table({"text": texts}), {"clip": model}, embed):
            for i, text in enumerate(batch["text"]):
                if batch["status"][i] != OK:
                    raise BenchmarkError(f"{model.spec}: cannot embed the text {str(text)!r}: {batch['detail'][i]}")
                text_vectors[str(text)] = np.asarray(batch["vector_clip"][i], dtype=np.float32)
    return image_vectors, text_vectors


def _stack(vectors: dict[str, np.ndarray], keys: Sequence[str], dim: int) -> np.ndarray:
    return np.stack([vectors[k] for k in keys]) if keys else np.zeros((0, dim), np.float32)


def severity_figures(bench: Benchmark, images: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                     names: Sequence[str], dim: int) -> dict[str, dict[str, Any]]:
    """Pair accuracy with both images degraded, per corruption and level: ``{corruption: {level: figure}}``."""
    from clipaudit.transforms import parse_graded

    pairs = bench.pairs
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        corruption, level = parse_graded(name) or (name, 0)
        correct = pair_correct(_stack(images, [f"{CORRUPTED}{name}|{p['image_a']}" for p in pairs], dim),
                               _stack(images, [f"{CORRUPTED}{name}|{p['image_b']}" for p in pairs], dim),
                               _stack(texts, [p["caption_a"] for p in pairs], dim),
                               _stack(texts, [p["caption_b"] for p in pairs], dim))
        out.setdefault(corruption, {})[str(level)] = rate(correct)
    return out


def measure(spec: str, bench: Benchmark, images: dict[str, np.ndarray], texts: dict[str, np.ndarray],
            graded: Sequence[str] = ()) -> ModelScore:
    """The model's outcomes on every item and its figures, from its vectors (``graded``: the corruptions the pair
    images were degraded by, see :func:`corrupted_images`)."""
    dim = len(next(iter(texts.values()))) if texts else 1
    pairs = bench.pairs
    correct = pair_correct(_stack(images, [ORIGINAL + p["image_a"] for p in pairs], dim),
                           _stack(images, [ORIGINAL + p["image_b"] for p in pairs], dim),
                           _stack(texts, [p["caption_a"] for p in pairs], dim),
                           _stack(texts, [p["caption_b"] for p in pairs], dim))
    invariant = np.zeros(len(bench.probes), dtype=bool)
    for i, probe in enumerate(bench.probes):
        pool = _stack(texts, probe["pool"], dim)
        own = probe["pool"].index(probe["caption"])
        before = own_rank(images[ORIGINAL + probe["image_id"]], pool, own)
        after = own_rank(images[TRANSFORMED + probe["probe_id"]], pool, own)
        invariant[i] = after <= before
    text_pairs = bench.text_pairs
    apart = separated(_stack(texts, [p["caption_a"] for p in text_pairs], dim),
                      _stack(texts, [p["caption_b"] for p in text_pairs], dim),
                      np.array([p["threshold"] for p in text_pairs], dtype=np.float64))
    transforms = sorted({p["transform"] for p in bench.probes})
    kinds = sorted({p["kind"] for p in pairs})
    figures = {
        "pair_accuracy": rate(correct),
        "pair_accuracy_by_kind": {k: rate(correct[[p["kind"] == k for p in pairs]]) for k in kinds},
        "invariance": {t: rate(invariant[[p["transform"] == t for p in bench.probes]]) for t in transforms},
        "text_separation": rate(apart),
        "n_pairs": len(pairs), "n_probes": len(bench.probes), "n_text_pairs": len(text_pairs),
    }
    if graded:
        figures["pair_accuracy_by_severity"] = severity_figures(bench, images, texts, graded, dim)
    return ModelScore(spec, correct, invariant, apart, figures)


def score_benchmark(bench_dir: str, specs: Sequence[str], runner: str = "ray",
                    embed: EmbedConfig | None = None, severities: Sequence[int] = ()) -> dict[str, ModelScore]:
    """Score each model of ``specs`` on the benchmark at ``bench_dir``; spec -> :class:`ModelScore`.

    Every spec is resolved (and refused when it has no text tower) before any work starts; each score's figures
    carry the model's ``provenance`` (what ran, with which weights). ``runner``: ``ray``
    (actor pools, as the embed stage) or ``local`` (in-process). ``severities``: levels (1 to 5) at which pair
    accuracy is measured again under every graded corruption (empty: not measured).
    """
    from clipaudit.models.provenance import provenance
    from clipaudit.runtime import LazyRunner

    if not specs:
        raise BenchmarkError("name at least one model to score (--model SPEC)")
    bench = load_benchmark(bench_dir)
    graded = graded_names(severities) if severities else []
    models = {spec: resolve_scored(spec) for spec in dict.fromkeys(specs)}
    provenances = {spec: provenance(model) for spec, model in models.items()}
    embed = embed or EmbedConfig()
    texts = texts_of(bench)
    lazy = LazyRunner(Config(ray=RayConfig(runner=runner), embed=embed))
    scores: dict[str, ModelScore] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="clipaudit-score-") as folder:
            extra = transformed_images(bench, folder, embed.max_pixels)
            extra.update(corrupted_images(bench, folder, embed.max_pixels, graded))
            images = image_work(bench, extra)
            for spec, model in models.items():
                image_vectors, text_vectors = embed_model(lazy, model, images, texts, embed)
                scores[spec] = measure(spec, bench, image_vectors, text_vectors, graded)
                scores[spec].figures["provenance"] = provenances[spec]
                log.info("score: %s: pair accuracy %s on %d pairs", spec,
                         scores[spec].figures["pair_accuracy"]["value"], len(bench.pairs))
    finally:
        lazy.close()
    return scores


def scores_json(bench: str, scores: dict[str, ModelScore]) -> dict[str, Any]:
    """``{"benchmark": BENCH_DIR, "models": {SPEC: figures}}`` (what ``--json`` writes); each model's figures carry
    its ``provenance`` (what ran: the spec, a fallback, the weights' source, revision and SHA-256; see
    :func:`clipaudit.models.provenance.provenance`)."""
    return {"benchmark": bench, "models": {spec: score.figures for spec, score in scores.items()}}


def _cell(figure: dict[str, Any]) -> str:
    if figure["value"] is None:
        return "-"
    low, high = figure["ci95"]
    return f"{figure['value']:.3f} [{low:.2f}, {high:.2f}]"


def _severity_cell(by_level: dict[str, Any] | None) -> str:
    values = [f["value"] for _, f in sorted((by_level or {}).items()) if f["value"] is not None]
    return " ".join(f"{v:.2f}" for v in values) or "-"


def format_scores(scores: dict[str, ModelScore]) -> str:
    """The printed table: one row per model, rate [95% interval] per measure; pair accuracy under each
    corruption as its values from the mildest level measured to the most severe."""
    transforms = sorted({t for s in scores.values() for t in s.figures["invariance"]})
    corruptions = list(dict.fromkeys(c for s in scores.values() for c in s.figures.get("pair_accuracy_by_severity")
                                     or {}))
    header = ["model", "pairs", "pair accuracy", *(f"invariance {t}" for t in transforms),
              *(f"pairs under {c}" for c in corruptions), "text separation"]
    rows = [[spec, str(s.figures["n_pairs"]), _cell(s.figures["pair_accuracy"]),
             *(_cell(s.figures["invariance"][t]) if t in s.figures["invariance"] else "-" for t in transforms),
             *(_severity_cell((s.figures.get("pair_accuracy_by_severity") or {}).get(c)) for c in corruptions),
             _cell(s.figures["text_separation"])] for spec, s in scores.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"
