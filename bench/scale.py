"""The audit's scale curve: seconds and peak driver memory per stage against the corpus size N.

Two parts, every measurement in a fresh subprocess (so each stage's peak resident memory is its own: the
kernel's high-water mark ``ru_maxrss`` of that process, which Ray's worker processes do not count in):

* **end to end** (``--sizes``): a synthetic corpus of N generated scenes (``dataset.format: synthetic``), tiny
  random models, LLM dry run, the stages one by one (``clipaudit <stage>``) over one run directory, Ray started
  by the stages that use it (embed, tcac) with ``--cpus`` CPUs;
* **on vectors** (``--vector-sizes``): random unit vectors of ``--dims`` (CLIP, reference, caption) written
  straight into ``image_embeddings_*`` and ``caption_embeddings``, with ``samples`` and a ``neighbours`` table
  of random lists (a few percent of images disagreeing, like a real corpus). It times

  - ``neighbours`` (the stage's driver work: read, restrict, the lists table, the write) with the search
    replaced by a stand-in that returns random lists, at every size; ``neighbours exact`` (the real in-process
    search, ``ray.runner: local``) at ``--knn-sizes`` only: exact search is quadratic and hours at 1M on 2 CPUs;
  - ``daf`` (the stage, from the written ``neighbours`` table) at every size;
  - ``pools`` (the tcac stage's caption corpus and caption pools: :func:`clipaudit.stages.tcac.load_corpus`,
    then :func:`clipaudit.tcac_scoring.caption_pools`) with a stand-in top-k at every size, and ``pools exact``
    with the real exact search at ``--knn-sizes``.

For each stage it prints wall seconds, the driver process's CPU seconds (all its threads, not its Ray workers'),
the driver's peak RSS, that peak less the process's RSS after its
imports (``added``), the ratio of ``added`` to the size of the vectors the stage holds, and the growth exponents
of wall seconds, CPU seconds and added memory fitted by least squares on log-log over N. Results go to
``bench/results/scale.json`` (``--out``)::

    .venv/bin/python bench/scale.py --quick        # about 2 minutes (3 on a loaded 2-core machine)
    .venv/bin/python bench/scale.py                # 1k, 4k, 16k end to end; vectors to 1M (about 40 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scale_jobs import _child

ROOT = Path(__file__).resolve().parent.parent
E2E_STAGES = ("ingest", "embed", "neighbours", "daf", "tcac", "summarize", "validate", "report")
VECTOR_STAGES = ("neighbours", "neighbours exact", "daf", "pools", "pools exact")
NEAR_LINEAR = 1.25
"""A fitted exponent above this is flagged as super-linear (the exact neighbour searches are expected to be)."""


@dataclass
class Measure:
    """One stage at one size: seconds, the driver's peak RSS and what it added over its imports, in bytes."""

    part: str
    stage: str
    n: int
    seconds: float | None
    cpu_seconds: float | None
    peak_rss: int | None
    base_rss: int | None
    vector_bytes: int
    status: str = "ok"
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def added(self) -> int | None:
        """Peak RSS above the RSS after imports."""
        if self.peak_rss is None or self.base_rss is None:
            return None
        return max(0, self.peak_rss - self.base_rss)


# ---------------------------------------------------------------- parent side: plan, run, fit, print


def _run_child(job: dict[str, Any], log_path: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """Run ``job`` in a fresh interpreter; ``(its result, status)`` (``ok``, ``failed`` or ``timeout``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as log:
        log.write(f"\n=== {job}\n")
        log.flush()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout_s,
                                  cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return None, "timeout"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, "failed"
    return json.loads(lines[-1]), "ok"


def _e2e_config(work: Path, n: int, cpus: int) -> Path:
    """Write the config of the end-to-end run of ``n`` synthetic images; returns its path."""
    run_dir = work / f"e2e-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    text = f"""run_dir: {run_dir / 'run'}
dataset:
  format: synthetic
  num_images: {n}
  seed: 0
models:
  clip: tiny-clip
  reference: tiny-dino
embed:
  batch_size: 64
  actors_per_model: 1
  cpus_per_actor: 0.5
ray:
  num_cpus: {cpus}
llm:
  dry_run: true
"""
    path = run_dir / "config.yaml"
    path.write_text(text)
    return path


def _vector_config(work: Path, n: int) -> Path:
    """Write the config of the vector-mode run directory of ``n`` images; returns its path."""
    run_dir = work / f"vectors-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(f"run_dir: {run_dir / 'run'}\ndataset:\n  format: synthetic\n  num_images: {n}\n"
                    "models:\n  clip: tiny-clip\n  reference: tiny-dino\nray:\n  runner: local\n"
                    "llm:\n  dry_run: true\n")
    return path


def _measure(part: str, stage: str, n: int, job: dict[str, Any], vector_bytes: int, log_path: Path,
             timeout_s: float) -> tuple[Measure, dict[str, Any] | None]:
    """Run one job, print its line, and return its :class:`Measure` and raw result."""
    result, status = _run_child(job, log_path, timeout_s)
    result = result or {}
    phases = {name: round(value, 3) for name, value in (result.get("phases") or {}).items()}
    measure = Measure(part, stage, n, result.get("seconds"), result.get("cpu_seconds"), result.get("peak_rss"),
                      result.get("base_rss"), vector_bytes, status, phases)
    print(_row(measure), flush=True)
    return measure, result


def run_e2e(sizes: Sequence[int], work: Path, cpus: int, timeout_s: float, log_path: Path) -> list[Measure]:
    """Every stage of the audit, one process each, over a synthetic corpus of each size."""
    measures: list[Measure] = []
    for n in sizes:
        config = _e2e_config(work, n, cpus)
        run_dir = str(config.parent / "run")
        vector_bytes = 0
        for stage in E2E_STAGES:
            job = {"kind": "stage", "stage": stage, "config": str(config), "run_dir": run_dir}
            measure, result = _measure("e2e", stage, n, job, vector_bytes, log_path, timeout_s)
            measures.append(measure)
            if stage == "embed" and result:
                vector_bytes = 4 * n * sum(result.get("dims", {}).values())
            if measure.status != "ok":
                break
    return measures


def run_vectors(sizes: Sequence[int], knn_sizes: Sequence[int], dims: dict[str, int], k: int, work: Path,
                timeout_s: float, log_path: Path) -> list[Measure]:
    """Neighbours, daf and the caption pools on random vectors written into the tables, per size."""
    measures: list[Measure] = []
    for n in sorted(set(sizes) | set(knn_sizes)):
        config = _vector_config(work, n)
        base = {"config": str(config), "run_dir": str(config.parent / "run"), "n": n, "k": k, "dims": dims}
        setup, status = _run_child({**base, "kind": "setup", "seed": n}, log_path, timeout_s)
        if status != "ok":
            print(f"vectors N={n}: writing the tables {status}; see {log_path}", flush=True)
            break
        image_bytes = 4 * n * (dims["clip"] + dims["reference"])
        caption_bytes = 4 * n * dims["caption"]
        plan = []
        if n in sizes:
            plan += [("daf", {"kind": "daf"}, 4 * n * dims["reference"]),
                     ("pools", {"kind": "pools", "exact": False}, caption_bytes),
                     ("neighbours", {"kind": "neighbours", "exact": False}, image_bytes)]
        if n in knn_sizes:
            plan += [("pools exact", {"kind": "pools", "exact": True}, caption_bytes),
                     ("neighbours exact", {"kind": "neighbours", "exact": True}, image_bytes)]
        for stage, job, vector_bytes in plan:
            measures.append(_measure("vectors", stage, n, {**base, **job}, vector_bytes, log_path, timeout_s)[0])
    return measures


def fit_exponent(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) on log(N); None with fewer than two sizes or a non-positive value."""
    import numpy as np

    points = [(n, v) for n, v in points if v is not None]
    if len({n for n, _ in points}) < 2 or any(v <= 0 for _, v in points):
        return None
    x, y = np.log([n for n, _ in points]), np.log([v for _, v in points])
    return float(np.polyfit(x, y, 1)[0])


def exponents(measures: Sequence[Measure]) -> list[dict[str, Any]]:
    """Per (part, stage): the fitted exponents of seconds and of added memory, and the largest memory ratio."""
    out = []
    keys = list(dict.fromkeys((m.part, m.stage) for m in measures))
    for part, stage in keys:
        rows = [m for m in measures if (m.part, m.stage) == (part, stage) and m.status == "ok"]
        ratios = [m.added / m.vector_bytes for m in rows if m.vector_bytes and m.added is not None]
        out.append({"part": part, "stage": stage, "sizes": [m.n for m in rows],
                    "time_exponent": fit_exponent([(m.n, m.seconds) for m in rows]),
                    "cpu_exponent": fit_exponent([(m.n, m.cpu_seconds) for m in rows]),
                    "memory_exponent": fit_exponent([(m.n, m.added) for m in rows if m.n >= 10_000]),
                    "max_added_over_vectors": max(ratios) if ratios else None})
    return out


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _row(m: Measure) -> str:
    ratio = f"{m.added / m.vector_bytes:.2f}" if m.vector_bytes and m.added is not None else "-"
    seconds = "-" if m.seconds is None else f"{m.seconds:.2f}"
    cpu = "-" if m.cpu_seconds is None else f"{m.cpu_seconds:.2f}"
    return (f"{m.part:8} {m.stage:17} {m.n:>9,} {seconds:>9} {cpu:>9} {_mb(m.peak_rss):>9} {_mb(m.added):>9} "
            f"{_mb(m.vector_bytes):>9} {ratio:>6} {m.status}")


HEADER = (f"{'part':8} {'stage':17} {'N':>9} {'seconds':>9} {'cpu s':>9} {'peak MB':>9} {'added MB':>9} {'vecs MB':>9} "
          f"{'ratio':>6} status")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_fits(fits: Sequence[dict[str, Any]]) -> None:
    """The exponents table; stages other than the exact searches whose CPU time grows faster than
    :data:`NEAR_LINEAR` are flagged."""
    print(f"\n{'part':8} {'stage':17} {'time exp':>9} {'cpu exp':>8} {'mem exp':>8} {'max added/vecs':>15}  sizes")
    for f in fits:
        growth = f["cpu_exponent"] if f["cpu_exponent"] is not None else f["time_exponent"]
        flag = "  SUPER-LINEAR" if growth is not None and growth > NEAR_LINEAR and "exact" not in f["stage"] else ""
        print(f"{f['part']:8} {f['stage']:17} {_num(f['time_exponent']):>9} {_num(f['cpu_exponent']):>8} "
              f"{_num(f['memory_exponent']):>8} {_num(f['max_added_over_vectors']):>15}  "
              f"{','.join(str(n) for n in f['sizes'])}{flag}")


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _sizes(text: str) -> list[int]:
    """``1000,4e3`` -> [1000, 4000]; zeros are dropped (``--sizes 0``: skip that part)."""
    return [n for n in (int(float(s)) for s in text.split(",") if s.strip()) if n > 0]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="200 images end to end, 2k and 8k on vectors, no exact search (about 2 minutes)")
    parser.add_argument("--sizes", help="end-to-end corpus sizes (default 1000,4000,16000); 0: none")
    parser.add_argument("--vector-sizes", help="vector-mode sizes (default 16000,64000,250000,1000000)")
    parser.add_argument("--knn-sizes", help="sizes of the exact searches (default 16000,64000,128000)")
    parser.add_argument("--dims", default="256,384,256", help="CLIP, reference and caption vector dimensions")
    parser.add_argument("--k", type=int, default=10, help="neighbours per image")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs of the end-to-end stages")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before one measurement is cut")
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "scale-work"), help="scratch folder")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"), help="JSON results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _defaults(args: argparse.Namespace) -> tuple[list[int], list[int], list[int]]:
    """End-to-end, vector and exact-search sizes from the flags (``--quick``: small ones)."""
    if args.quick:
        return (_sizes(args.sizes or "200"), _sizes(args.vector_sizes or "2000,8000"), _sizes(args.knn_sizes or "0"))
    return (_sizes(args.sizes or "1000,4000,16000"), _sizes(args.vector_sizes or "16000,64000,250000,1000000"),
            _sizes(args.knn_sizes or "16000,64000,128000"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scale curve, print the table and the exponents, write the JSON."""
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    e2e_sizes, vector_sizes, knn_sizes = _defaults(args)
    clip, reference, caption = _sizes(args.dims)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "children.log"
    machine = _machine()
    print(f"machine: {machine}\nchild logs: {log_path}\n{HEADER}", flush=True)
    measures = run_e2e(e2e_sizes, work, args.cpus, args.timeout, log_path) if e2e_sizes else []
    measures += run_vectors(vector_sizes, knn_sizes, {"clip": clip, "reference": reference, "caption": caption},
                            args.k, work, args.timeout, log_path)
    fits = exponents(measures)
    print_fits(fits)
    machine["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "dims": args.dims, "k": args.k,
                               "measures": [{**asdict(m), "added": m.added} for m in measures],
                               "fits": fits}, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
