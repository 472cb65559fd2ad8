"""``clipaudit export RUN_DIR OUT_DIR``: what an audit found, written as a versioned benchmark folder.

Reads the run's tables (:mod:`clipaudit.benchmark.collect`), rebuilds the TCAC probes' caption pools
(:mod:`clipaudit.benchmark.pools`), asks the LLM for distinguishing captions where the run's LLM stages ran
(:mod:`clipaudit.benchmark.captions`; ``llm="off"`` never asks), and writes the folder described in
:mod:`clipaudit.benchmark.format` with its dataset card (:mod:`clipaudit.benchmark.card`). Rows are sorted, files
are written with fixed options and nothing time-dependent, so the same run exports to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from clipaudit.benchmark import card, hf_parquet
from clipaudit.benchmark.collect import BLIND, DAF, collect_pairs, probe_rows, text_pair_rows
from clipaudit.benchmark.format import (
    CARD,
    FORMAT_VERSION,
    HF_INVARIANCE,
    HF_PAIRS,
    IMAGE_MODES,
    IMAGES_DIR,
    INVARIANCE,
    INVARIANCE_SCHEMA,
    MANIFEST,
    PAIRS,
    PAIRS_SCHEMA,
    TEXT_PAIRS,
    TEXT_PAIRS_SCHEMA,
    BenchmarkError,
    json_text,
    parquet_bytes,
)
from clipaudit.benchmark.pools import attach_pools
from clipaudit.io import fs
from clipaudit.records import (
    BLIND_PAIRS,
    DAF_CASES,
    FAILURE_CHECKS,
    FAILURE_TYPES,
    IMAGE_EMBEDDINGS,
    SAMPLES,
    TCAC_CASES,
    StageStats,
)
from clipaudit.run_models import run_provenance
from clipaudit.run_view import RunView, is_random_spec

log = logging.getLogger("clipaudit.benchmark")
LLM_MODES = ("auto", "off")
FINDINGS = (BLIND_PAIRS, DAF_CASES, TCAC_CASES, FAILURE_CHECKS)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def open_run(run: str, clip_model: str | None = None) -> RunView:
    """The run to export (``RUN_DIR`` or ``RUN_DIR@RUN_ID``), checked to hold what an export needs, as CLIP-role
    model ``clip_model`` of it sees it (None: the run's first CLIP model; BenchmarkError for a model the run did
    not audit)."""
    view = RunView.parse(run)
    specs = view.clip_models()
    if clip_model is not None and clip_model not in specs:
        raise BenchmarkError(f"{view.label}: no CLIP-role model {clip_model!r} in this run; its models: "
                             f"{', '.join(specs) or 'none found'} (--clip-model SPEC, as written in models.clip)")
    spec = clip_model if clip_model is not None else (specs[0] if specs else None)
    if spec is not None:
        view = view.for_clip_model(spec)
    if not view.exists(SAMPLES):
        raise BenchmarkError(f"{view.label}: no {SAMPLES} table: run the audit first "
                             "(clipaudit run --config CONFIG)")
    if not any(view.exists(name) for name in FINDINGS):
        raise BenchmarkError(f"{view.label}: nothing to export: none of the tables {', '.join(FINDINGS)} is there; "
                             "run the daf, tcac or validate stage first (clipaudit run --config CONFIG)")
    return view


def plan_counts(view: RunView) -> dict[str, Any]:
    """What an export of ``view`` would hold, without writing anything: pairs by kind, pairs left out, TCAC probes
    per transform (before the pool check), text pairs per failure type."""
    pairs = collect_pairs(view, similarities=False)
    invariance: dict[str, int] = {}
    for row in probe_rows(view):
        invariance[row["transform"]] = invariance.get(row["transform"], 0) + 1
    text_pairs: dict[str, int] = {}
    for row in text_pair_rows(view):
        text_pairs[row["failure_type"]] = text_pairs.get(row["failure_type"], 0) + 1
    return {"pairs": {BLIND: 0, DAF: 0, **pairs.counts()},
            "blind_and_daf": sum(1 for row in pairs.rows if row["blind_pair"] and row["daf_case"]),
            "pairs_left_out": dict(sorted(pairs.left_out.items())),
            "invariance": dict(sorted(invariance.items())), "text_pairs": dict(sorted(text_pairs.items()))}


def image_file_name(image_id: str, uri: str) -> str:
    """The file an image is copied to under ``images/``: its id made safe for any filesystem (with a short hash
    of the id when that changed it, so two ids never share a file), with the source's image suffix."""
    safe = _UNSAFE.sub("_", image_id)
    if safe != image_id:
        safe += "-" + hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:8]
    member = uri.rsplit(fs.TAR_SEPARATOR, 1)[-1]
    suffix = os.path.splitext(member.split("?", 1)[0])[1].lower()
    if suffix in _IMAGE_SUFFIXES and not safe.lower().endswith(suffix):
        safe += suffix
    return f"{IMAGES_DIR}/{safe}"


def run_config(view: RunView, overrides: Sequence[str] = ()) -> Any:
    """The run's resolved configuration (``config.resolved.yaml``; defaults where there is none) with
    ``overrides``, its ``run_dir`` the run being exported."""
    from clipaudit.config import load_config

    path = fs.join(view.run_dir, "config.resolved.yaml")
    sets = [*overrides, f"run_dir={json.dumps(view.run_dir)}"]
    config = load_config(path if fs.exists(path) else None, sets)
    if view.clip_model is not None and view.clip_model in config.models.clip_models:
        config = config.for_clip_model(view.clip_model)
    return config


def _models(view: RunView) -> dict[str, str | None]:
    models: dict[str, str | None] = {}
    for role, name in IMAGE_EMBEDDINGS.items():
        table = view.read(name, ["model"])
        models[role] = table.column("model")[0].as_py() if table is not None and table.num_rows else None
    return models


def _thresholds(view: RunView, text_pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    config = view.config() or {}
    daf_notes = ((view.stats("daf") or {}).get("notes") or {})
    daf = config.get("daf") or {}
    tcac = config.get("tcac") or {}
    return {
        "neighbours_k": (config.get("neighbours") or {}).get("k"),
        "daf_cases": {key: daf.get(key) for key in ("max_overlap", "top_n")},
        "blind_pairs": daf_notes.get("blind_pairs"),
        "tcac": {key: tcac.get(key) for key in ("seed", "top_k", "pool_neighbours", "cases_per_transform")},
        "text_pairs": {row["failure_type"]: row["threshold"] for row in text_pairs},
    }


def _source(view: RunView) -> dict[str, Any]:
    """Where the findings come from: the run, its models (``provenance``: what each ran with, from the run's
    ``models.json``; None where no run recorded it), the corpus."""
    config = view.config() or {}
    dataset = {key: value for key, value in (config.get("dataset") or {}).items()
               if key in ("format", "captions", "images", "num_images", "seed", "caption_choice")
               and value is not None}
    models = _models(view)
    source = {"run_dir": view.run_dir, "run_id": view.run_id(), "models": models, "dataset": dataset,
              "random_models": any(is_random_spec(spec) for spec in models.values() if spec),
              "provenance": run_provenance(view.run_dir, view.config(), view.clip_model)}
    if view.clip_model is not None:
        source["clip_model"] = view.clip_model
    return source


def _llm_named(view: RunView) -> bool:
    """Whether the LLM named failure types in this run (rows of the ``llm`` namer: the name stage's offline rows
    say nothing about an endpoint being there)."""
    table = view.read(FAILURE_TYPES)
    if table is None:
        return False
    return "namer" not in table.column_names or "llm" in table.column("namer").to_pylist()


def _llm_captions(view: RunView, pairs: list[dict[str, Any]], llm: str,
                  overrides: Sequence[str]) -> dict[str, tuple[str, str]]:
    if llm == "off" or not pairs or not _llm_named(view):
        return {}
    from clipaudit.benchmark.captions import distinguishing_captions

    return distinguishing_captions(run_config(view, overrides), view.tables, pairs, StageStats("export"))


class _Images:
    """Where each image of the benchmark is found: a copy under ``images/`` or its URI; with copies, each image's
    bytes (read once, for ``images/`` and the ``hf/`` tables alike)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.files: dict[str, tuple[str, str]] = {}
        self._data: dict[str, bytes] = {}

    def file(self, image_id: str, uri: str) -> str:
        """The ``file`` value of an image (registering it for copying)."""
        if self.mode == "reference":
            return uri
        name = image_file_name(image_id, uri)
        self.files[image_id] = (name, uri)
        return name

    def read(self, image_id: str) -> bytes:
        """The bytes of a registered image (read from its URI the first time)."""
        from clipaudit.io.images import ImageRejected, read_image_bytes

        if image_id not in self._data:
            try:
                self._data[image_id] = read_image_bytes(self.files[image_id][1])
            except ImageRejected as exc:
                raise BenchmarkError(f"cannot copy image {image_id} ({exc}); export with --images reference to "
                                     "write its URI instead") from exc
        return self._data[image_id]

    def data(self, image_id: str, file: str) -> bytes | None:
        """An image's bytes for the ``hf/`` tables: None where images are referenced by URI."""
        return None if self.mode == "reference" else self.read(image_id)

    def copy(self, out_dir: str) -> None:
        """Copy every registered image's bytes into the folder."""
        for image_id, (name, _uri) in sorted(self.files.items()):
            fs.write_bytes(fs.join(out_dir, *name.split("/")), self.read(image_id))


def _prepare_out_dir(out_dir: str) -> None:
    """Refuse to write into a folder that holds something other than a benchmark; remove an earlier export's
    images (the new export writes its own)."""
    if fs.is_remote(out_dir) or not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise BenchmarkError(f"{out_dir}: the folder is not empty and is not a benchmark folder: choose another "
                             "OUT_DIR")
    images = os.path.join(out_dir, IMAGES_DIR)
    if os.path.isdir(images):
        for name in os.listdir(images):
            os.remove(os.path.join(images, name))


def export_benchmark(run: str, out_dir: str, images: str = "copy", llm: str = "auto",
                     overrides: Sequence[str] = (), clip_model: str | None = None, *,
                     license: str | None = None, attribution: str | None = None) -> dict[str, Any]:
    """Export the findings of ``run`` (``RUN_DIR`` or ``RUN_DIR@RUN_ID``) to the benchmark folder ``out_dir``;
    returns the manifest written to ``benchmark.json``.

    ``images``: ``copy`` (into ``images/``) or ``reference`` (the URIs). ``llm``: ``auto`` asks the LLM for
    distinguishing captions when the run's LLM stages ran (with the run's ``llm`` config and ``overrides``);
    ``off`` never asks. ``clip_model``: which CLIP-role model's findings, for a run of several (a spec of its
    ``models.clip``; None: the first). ``license`` / ``attribution``: the images' licence and attribution for the
    ``license`` / ``attribution`` columns of the ``hf/`` tables and the card, where the run's ``samples`` table
    has no value of its own (None: the source corpus's default, if clipaudit knows one; see
    :mod:`clipaudit.benchmark.hf_parquet`).
    """
    if images not in IMAGE_MODES:
        raise BenchmarkError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    if llm not in LLM_MODES:
        raise BenchmarkError(f"--llm must be one of {', '.join(LLM_MODES)}, got {llm!r}")
    view = open_run(run, clip_model)
    _prepare_out_dir(out_dir)
    pairs = collect_pairs(view)
    probes, mismatched = attach_pools(view, probe_rows(view))
    text_pairs = text_pair_rows(view)
    captions = _llm_captions(view, pairs.rows, llm, overrides)
    files = _Images(images)
    pair_rows = [{**row, "file_a": files.file(row["image_a"], row["uri_a"]),
                  "file_b": files.file(row["image_b"], row["uri_b"]),
                  "llm_caption_a": captions.get(row["pair_id"], (None, None))[0],
                  "llm_caption_b": captions.get(row["pair_id"], (None, None))[1]} for row in pairs.rows]
    uris = view.samples({p["image_id"] for p in probes}, ("image_id", "uri"))
    probe_table = [{"probe_id": f"{p['image_id']}|{p['transform']}", "image_id": p["image_id"],
                    "file": files.file(p["image_id"], uris[p["image_id"]]["uri"]), "transform": p["transform"],
                    "params": p["params"], "settings": p["settings"], "caption": p["gt_caption"], "pool": p["pool"],
                    "audited_rank_before": p["gt_rank_before"], "audited_rank_after": p["gt_rank_after"]}
                   for p in probes]
    tables = {PAIRS: pa.Table.from_pylist(pair_rows, schema=PAIRS_SCHEMA),
              INVARIANCE: pa.Table.from_pylist(probe_table, schema=INVARIANCE_SCHEMA),
              TEXT_PAIRS: pa.Table.from_pylist(text_pairs, schema=TEXT_PAIRS_SCHEMA)}
    contents = {name: parquet_bytes(table) for name, table in tables.items()}
    source = _source(view)
    image_ids = {r["image_a"] for r in pair_rows} | {r["image_b"] for r in pair_rows} | {
        p["image_id"] for p in probe_table}
    licences = hf_parquet.read_licences(view, image_ids, license, attribution, source["dataset"].get("format"))
    contents[HF_PAIRS] = hf_parquet.hf_parquet_bytes(hf_parquet.pairs_table(pair_rows, files.data, licences))
    contents[HF_INVARIANCE] = hf_parquet.hf_parquet_bytes(
        hf_parquet.invariance_table(probe_table, files.data, licences))
    counts = plan_counts(view)
    counts["invariance"] = {t: sum(1 for p in probes if p["transform"] == t) for t in counts["invariance"]}
    counts.update(invariance_left_out=mismatched, llm_captions=len(captions))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": f"clipaudit-benchmark-{source['run_id'] or 'run'}",
        "source": source, "images": images, "thresholds": _thresholds(view, text_pairs), "counts": counts,
        "license": licences.manifest(),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(contents.items())},
    }
    fs.makedirs(out_dir)
    for name, data in contents.items():
        fs.write_bytes(fs.join(out_dir, *name.split("/")), data)
    files.copy(out_dir)
    fs.write_text(fs.join(out_dir, CARD), card.card_text(manifest))
    fs.write_text(fs.join(out_dir, MANIFEST), json_text(manifest))
    log.info("export: %d image pairs (%d left out: captions do not tell them apart), %d invariance probes, %d text "
             "pairs -> %s", len(pair_rows), sum(pairs.left_out.values()), len(probe_table), len(text_pairs),
             out_dir)
    return manifest
