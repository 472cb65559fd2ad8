"""bench/scale.py's child side: the jobs it runs one per fresh process (stages, table setup, stand-in searches),
each timed with its driver's CPU seconds and peak RSS."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- child side: one measurement per process


def _rss() -> int:
    """This process's resident set size now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss() -> int:
    """This process's resident high-water mark, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _preimport() -> None:
    """Import what the stages import and touch LanceDB once, so that the baseline RSS holds the libraries and
    their runtimes, and what the stage adds over it is its data."""
    import tempfile

    import numpy  # noqa: F401
    import pyarrow as pa
    import torch  # noqa: F401

    import clipaudit.pipeline  # noqa: F401
    import clipaudit.stages.daf  # noqa: F401
    import clipaudit.stages.tcac  # noqa: F401
    from clipaudit.io.tables import RunTables

    with tempfile.TemporaryDirectory() as scratch:
        tables = RunTables(scratch)
        schema = pa.schema([pa.field("x", pa.int64())])
        tables.replace("warm", pa.table({"x": list(range(10))}), schema)
        tables.read("warm")


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process and return its wall and CPU seconds, peak RSS and baseline RSS."""
    _preimport()
    base = _rss()
    started, cpu = time.perf_counter(), _cpu_seconds()
    extra = JOBS[job["kind"]](job) or {}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu, "peak_rss": _peak_rss(), "base_rss": base,
            **extra}


def _stage_job(job: dict[str, Any]) -> dict[str, Any]:
    """``clipaudit <stage> --config C``; returns the stage's per-phase seconds from its stats file."""
    from clipaudit.cli import main

    if main([job["stage"], "--config", job["config"]]) != 0:
        raise SystemExit(f"clipaudit {job['stage']} failed")
    stats = Path(job["run_dir"]) / "stats" / f"{job['stage']}.json"
    phases = json.loads(stats.read_text())["seconds"] if stats.exists() else {}
    return {"phases": phases, "dims": _table_dims(job["run_dir"])}


def _table_dims(run_dir: str) -> dict[str, int]:
    """The vector dimension of each image embedding table of ``run_dir`` that exists."""
    from clipaudit.io.tables import RunTables
    from clipaudit.records import IMAGE_EMBEDDINGS

    tables = RunTables(run_dir)
    dims = {}
    for role, name in IMAGE_EMBEDDINGS.items():
        if tables.exists(name):
            first = tables.read(name, ["vector"]).column("vector")
            dims[role] = len(first[0].as_py()) if len(first) else 0
    return dims


def _config(job: dict[str, Any]):
    """The config of a vector-mode job: its run_dir, tiny models, in-process search."""
    from clipaudit.config import load_config

    return load_config(job["config"], ["ray.runner=local"])


def _unit_rows(rng, n: int, dim: int):
    """``(n, dim)`` random float32 rows of unit length."""
    import numpy as np

    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _fixed_list(values, dim: int):
    """A fixed-size-list Arrow array of ``dim`` float32 values per row."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)


def _random_lists(rng, n: int, k: int, disagree: float) -> tuple[Any, Any]:
    """Two ``(n, k)`` neighbour-index lists (no repeats, never the row itself): the reference's shares half the
    CLIP list, except on a ``disagree`` share of rows, where it is an unrelated list (a DAF case)."""
    import numpy as np

    rows = np.arange(n)[:, None]
    start = rng.integers(1, n - 2 * k, size=(n, 1))
    clip = (rows + start + np.arange(k)) % n
    reference = (rows + start + k // 2 + np.arange(k)) % n
    other = (rows + rng.integers(1, n - k, size=(n, 1)) + np.arange(k)) % n
    flip = rng.random(n) < disagree
    reference[flip] = other[flip]
    return clip, reference


def _sorted_sims(rng, n: int, k: int):
    """``(n, k)`` descending similarities, the top ones near 1 for a few rows (CLIP-blind candidates)."""
    import numpy as np

    sims = np.sort(rng.uniform(0.5, 0.97, size=(n, k)).astype(np.float32), axis=1)[:, ::-1]
    return np.ascontiguousarray(sims)


def _setup_job(job: dict[str, Any]) -> dict[str, Any]:
    """Write samples, both image embedding tables, caption embeddings and a random ``neighbours`` table."""
    import numpy as np
    import pyarrow as pa

    from clipaudit.io.tables import RunTables
    from clipaudit.records import (
        CAPTION_EMBEDDINGS,
        IMAGE_EMBEDDINGS,
        NEIGHBOURS,
        NEIGHBOURS_STORED_SCHEMA,
        SAMPLES,
        SAMPLES_SCHEMA,
        caption_embeddings_schema,
        image_embeddings_schema,
    )
    from clipaudit.stages.neighbours import Slot, lists_table

    n, k, dims = job["n"], job["k"], job["dims"]
    rng = np.random.default_rng(job["seed"])
    tables = RunTables(job["run_dir"])
    ids = pa.array([f"img_{i:07d}" for i in range(n)], pa.string())
    captions = pa.array([f"a photo number {i} of a scene with {i % 97} things" for i in range(n)], pa.string())
    samples = pa.table({"image_id": ids, "uri": ids, "captions": pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)), captions), "caption": captions, "source": ids,
        "label": pa.nulls(n, pa.string())}, schema=SAMPLES_SCHEMA)
    tables.replace(SAMPLES, samples, SAMPLES_SCHEMA)
    for role, spec in (("clip", "tiny-clip"), ("reference", "tiny-dino")):
        schema = image_embeddings_schema(dims[role])
        rows = pa.table({"image_id": ids, "model": pa.array([spec] * n, pa.string()),
                         "vector": _fixed_list(_unit_rows(rng, n, dims[role]), dims[role])}, schema=schema)
        tables.replace(IMAGE_EMBEDDINGS[role], rows, schema)
    schema = caption_embeddings_schema(dims["caption"])
    caption_rows = pa.table({"caption_id": pa.array([f"img_{i:07d}#0" for i in range(n)]), "image_id": ids,
                             "text": captions, "model": pa.array(["tiny-clip"] * n, pa.string()),
                             "vector": _fixed_list(_unit_rows(rng, n, dims["caption"]), dims["caption"])},
                            schema=schema)
    tables.replace(CAPTION_EMBEDDINGS, caption_rows, schema)
    clip, reference = _random_lists(rng, n, k, disagree=0.03)
    parts = [lists_table(ids, Slot("clip", "clip", clip_model="tiny-clip"), clip, _sorted_sims(rng, n, k), "exact",
                         "tiny-clip"),
             lists_table(ids, Slot("reference", "reference", reference_model="tiny-dino"), reference,
                         _sorted_sims(rng, n, k), "exact", "tiny-dino")]
    tables.replace(NEIGHBOURS, pa.concat_tables(parts), NEIGHBOURS_STORED_SCHEMA)
    return {}


class _StandInSearch:
    """A top-k search that returns random valid lists at once: the neighbours stage's driver work alone."""

    def __init__(self) -> None:
        self.notes: dict[str, object] = {"where": "stand-in"}

    def __enter__(self) -> _StandInSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def self_topk(self, vectors, k: int):
        """Random lists and descending similarities for every row of ``vectors``."""
        import numpy as np

        rng = np.random.default_rng(0)
        clip, _ = _random_lists(rng, len(vectors), k, 0.0)
        return clip, _sorted_sims(rng, len(vectors), k)

    def cross_topk(self, queries, corpus, k: int, exclude=None):
        """Random lists of corpus rows (never the excluded row) for every query."""
        import numpy as np

        rng = np.random.default_rng(0)
        n = len(corpus)
        start = rng.integers(1, n - k, size=(len(queries), 1))
        own = np.asarray(exclude if exclude is not None else np.zeros(len(queries), np.int64))[:, None]
        return (own + start + np.arange(k)) % n, _sorted_sims(rng, len(queries), k)


class _StandInRunner:
    """What the neighbours stage asks of a runner: only ``topk``."""

    def topk(self, neighbours) -> _StandInSearch:
        return _StandInSearch()


def _neighbours_job(job: dict[str, Any]) -> dict[str, Any]:
    """The neighbours stage over the written vectors: real in-process search, or the stand-in."""
    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import LocalRunner
    from clipaudit.stages.neighbours import run_neighbours

    config = _config(job)
    tables = RunTables(config.run_dir)
    if tables.exists("neighbours"):
        tables.db.drop_table("neighbours")
    runner = LocalRunner() if job["exact"] else _StandInRunner()
    stats = run_neighbours(config, tables, runner)
    return {"phases": stats.seconds}


def _daf_job(job: dict[str, Any]) -> dict[str, Any]:
    """The daf stage over the ``neighbours`` table."""
    from clipaudit.io.tables import RunTables
    from clipaudit.stages.daf import run_daf

    config = _config(job)
    stats = run_daf(config, RunTables(config.run_dir))
    return {"phases": stats.seconds, "cases": stats.counts.get("cases")}


@dataclass
class _SpecOnly:
    """The one field of a resolved model that :func:`clipaudit.stages.tcac.load_corpus` reads."""

    spec: str


def _pools_job(job: dict[str, Any]) -> dict[str, Any]:
    """The tcac stage's caption corpus and caption pools of every image, as :func:`score_missing` builds them."""
    import numpy as np

    from clipaudit import knn
    from clipaudit.io.tables import RunTables
    from clipaudit.records import SAMPLES, StageStats
    from clipaudit.stages.tcac import load_corpus
    from clipaudit.tcac_scoring import caption_pools

    config = _config(job)
    tables = RunTables(config.run_dir)
    stats = StageStats("pools")
    phases: dict[str, float] = {}
    with _timed(phases, "corpus"):
        samples = tables.read(SAMPLES, ["image_id", "uri", "captions", "caption"])
        corpus = load_corpus(tables, samples, None, _SpecOnly("tiny-clip"), config.embed, stats)
        own = corpus.rows_of(samples.column("captions"))
    topk = knn.cross_topk if job["exact"] else _StandInSearch().cross_topk
    with _timed(phases, "pools"):
        pools = caption_pools(corpus, own, config.tcac.pool_neighbours,
                              lambda q, c, k, ex: topk(q, c, k, exclude=ex), image_ids=samples.column("image_id"))
    sizes = pools.sizes()
    return {"phases": phases, "mean_pool": float(np.mean(sizes)) if len(sizes) else 0.0}


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's seconds to ``phases[name]``."""
    started = time.perf_counter()
    yield
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "stage": _stage_job, "setup": _setup_job, "neighbours": _neighbours_job, "daf": _daf_job,
    "pools": _pools_job,
}

