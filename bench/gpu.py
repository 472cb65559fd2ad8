"""GPU throughput: the project's embed, TCAC and exact kNN paths against bare torch loops, side by side in one run.

Three sections, each timing the project's own code and a bare loop over the same inputs, on the same device, in
the same dtype and batch size, interleaved (``--repeats`` rounds, the fastest round of each path reported):

* **embed**: :class:`clipaudit.batches.embed.ImageEncoder` (what each model actor of the embed stage runs per
  batch: pinned host memory, the copy to the device, the forward, the checks, the vectors back on the host) for
  the CLIP role (default ``open_clip:ViT-B-32/random``: ``open_clip.create_model("ViT-B-32", pretrained=None)``)
  and the reference role (default ``hf-random:dinov2-base``: ``Dinov2Model(Dinov2Config(...))`` with the base
  sizes), both built by the project's registry (:func:`clipaudit.models.resolve_model`), random weights, the real
  compute; fp16 on CUDA, fp32 on the CPU, as the registry loads them. The bare loop runs the same ``nn.Module``
  on the same preprocessed batches: ``bare`` copies each host batch to the device, casts it, runs the forward
  and brings the normalised vectors back; ``forward only`` runs the forward on batches already on the device
  (the ceiling). Preprocessing (a CPU task in the stage) is done once beforehand and timed by neither.
* **tcac**: :class:`clipaudit.batches.tcac.TransformedEncoder` (the CLIP actor of the tcac stage: the seven
  transforms as batched tensor ops on its device, the crop, the model's preprocessing, the forward) over the rows
  that :func:`~clipaudit.batches.tcac.prepare_resized` (a CPU task, done beforehand) makes of generated
  500 x 375 images, against a bare loop of the same kernels (:func:`clipaudit.transforms.transform_batch`,
  same drawn parameters), the crop and the normalisation on the device, and the forward. Figures are transformed
  images (image x transform rows) per second; the project's own per-row seconds split its time into the
  transform (with the crop) and the rest (to the host, preprocessing, forward).
* **knn**: :func:`clipaudit.knn.self_topk_exact` (N x N, each row excluding itself) and
  :func:`clipaudit.knn.cross_topk_exact` (Q queries against the N rows), exact top-k with ``margin`` extra
  low-precision candidates re-scored in fp32 (fp16 products on CUDA, fp32 on the CPU), against a bare
  ``torch.mm`` + ``torch.topk`` over blocks of rows in the same dtype (not exact in fp16); both include copying
  the vectors to the device and the ids back. Figures are queries (rows) per second; ``refine`` is the share of
  the project's self search spent making the low-precision candidates exact. On CUDA, fp16 reduced-precision
  reductions are turned off for this section, as the top-k actors do (the exactness bound assumes it).

Every ratio is project / bare throughput (1.0: the project's path costs nothing over a bare loop). The header
names where it was measured (device, its name, torch version, dtype). Without CUDA (or with ``--quick``) the sizes
are small, so the script runs to the end on any machine; ``--device cpu`` forces the CPU.

    python bench/gpu.py [--quick] [--device auto|cpu|cuda] [--json OUT.json] [--sections embed,tcac,knn]
                        [--clip SPEC] [--reference SPEC] [--images N] [--batch-size B] [--tcac-images N]
                        [--tcac-batch ROWS] [--knn-n N] [--knn-queries Q] [--knn-dim D] [--repeats R]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_encoders import embed_section, tcac_section
from gpu_knn import knn_section
from gpu_measure import _release

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECTIONS = ("embed", "tcac", "knn")


@dataclasses.dataclass
class Sizes:
    """How much work each section does."""

    images: int
    batch_size: int
    tcac_images: int
    tcac_batch: int
    knn_n: int
    knn_queries: int
    knn_dim: int
    k: int
    warmup: int
    repeats: int


FULL = Sizes(images=4096, batch_size=256, tcac_images=512, tcac_batch=256, knn_n=200_000, knn_queries=50_000,
             knn_dim=512, k=10, warmup=3, repeats=3)
"""The CUDA sizes (an H100-class GPU: a few minutes in all)."""

QUICK = Sizes(images=16, batch_size=8, tcac_images=4, tcac_batch=16, knn_n=4000, knn_queries=1000, knn_dim=512,
              k=10, warmup=1, repeats=1)
"""``--quick`` and any run without CUDA: minutes on 2 CPU cores with the real architectures."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when torch sees a GPU")
    parser.add_argument("--quick", action="store_true", help="the small sizes (the default without CUDA)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "gpu.json"),
                        help="where to write the results")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: embed, tcac, knn")
    parser.add_argument("--clip", default="open_clip:ViT-B-32/random", help="the CLIP-role model (embed and tcac)")
    parser.add_argument("--reference", default="hf-random:dinov2-base", help="the reference-role model (embed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all the CPUs)")
    for field in dataclasses.fields(Sizes):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=int, default=None,
                            help=f"default {getattr(FULL, field.name)} on CUDA, {getattr(QUICK, field.name)} quick")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)} (known: {', '.join(SECTIONS)})")
    return args


# ---------------------------------------------------------------------------------------------------- report


def describe_device(device: str) -> dict[str, Any]:
    """Where the figures are measured: the device, its name, torch and CUDA versions, the dtype, the CPUs."""
    import platform

    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.startswith("cuda"):
        index = torch.cuda.current_device()
        info.update(device=f"cuda:{index}", device_name=torch.cuda.get_device_name(index), dtype="float16",
                    cuda=torch.version.cuda)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        info.update(device="cpu", device_name=name, dtype="float32", cuda=None)
    return info


def _table(results: dict[str, Any]) -> list[str]:
    rows = [("section", "what", "size", "project", "bare", "unit", "project/bare", "note")]
    for role, r in results.get("embed", {}).items():
        rows.append(("embed", f"{role}: {r['spec']}", f"{r['images']} img, batch {r['batch_size']}",
                     f"{r['project_img_per_s']:.1f}", f"{r['bare_img_per_s']:.1f}", "img/s", f"{r['ratio']:.2f}",
                     f"forward only {r['forward_only_img_per_s']:.1f} img/s ({r['ratio_to_forward_only']:.2f}); "
                     f"{r['model_dtype']}" + _rejected_note(r)))
    if "tcac" in results:
        r = results["tcac"]
        rows.append(("tcac", f"{len(r['transforms'])} transforms: {r['spec']}",
                     f"{r['rows']} rows, {r['rows_per_batch']}/batch", f"{r['project_rows_per_s']:.1f}",
                     f"{r['bare_rows_per_s']:.1f}", "rows/s", f"{r['ratio']:.2f}",
                     f"transforms {r['project_transform_share']:.0%} of the project's time; {r['model_dtype']}"
                     + _rejected_note(r)))
    if "knn" in results:
        r = results["knn"]
        for kind in ("self", "cross"):
            s = r[kind]
            note = f"ids shared with bare {s['id_overlap_project_vs_bare']:.3f}; {r['dtype']}"
            if kind == "self":
                note += f"; refine {s['refine_share']:.0%} of the search"
            rows.append(("knn", f"{kind} top-{r['k']} exact", f"{s['queries']} x {s['corpus']}, d {r['dim']}",
                         f"{s['project_queries_per_s']:.0f}", f"{s['bare_queries_per_s']:.0f}", "queries/s",
                         f"{s['ratio']:.2f}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in
                             enumerate(zip(row, widths))) + "  " + row[-1] for row in rows]


def _rejected_note(result: dict[str, Any]) -> str:
    rejected = result["rejected_rows_timed"]
    return f"; {rejected} ROWS REJECTED by the project's checks (not finite?)" if rejected else ""


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ratios = {f"embed_{role}": r["ratio"] for role, r in results.get("embed", {}).items()}
    if "tcac" in results:
        ratios["tcac"] = results["tcac"]["ratio"]
    if "knn" in results:
        ratios.update(knn_self=results["knn"]["self"]["ratio"], knn_cross=results["knn"]["cross"]["ratio"])
    return ratios


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 100 else round(value, 1)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    import torch

    logging.getLogger("clipaudit").setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    preset = QUICK if args.quick or device == "cpu" else FULL
    sizes = Sizes(**{f.name: getattr(args, f.name) if getattr(args, f.name) is not None else getattr(preset, f.name)
                     for f in dataclasses.fields(Sizes)})
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    sections = args.sections.split(",")
    where = describe_device(device)
    where["load_average_start"] = round(os.getloadavg()[0], 2)
    print(f"GPU benchmark, measured on {where['device']} ({where['device_name']}), torch {where['torch']}"
          f"{', CUDA ' + where['cuda'] if where['cuda'] else ''}, dtype {where['dtype']}, {where['cpus']} CPUs, "
          f"{where['torch_threads']} torch threads, {'quick' if preset is QUICK else 'full'} sizes", flush=True)
    if device == "cpu":
        print("  (no CUDA here: CPU figures in fp32 at small sizes; they say nothing about a GPU)", flush=True)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "embed" in sections:
            results["embed"] = {}
            for role, spec in (("clip", args.clip), ("reference", args.reference)):
                results["embed"][role] = embed_section(spec, role, device, sizes)
                _release(device)
        if "tcac" in sections:
            results["tcac"] = tcac_section(args.clip, device, sizes, Path(tmp))
            _release(device)
        if "knn" in sections:
            results["knn"] = knn_section(device, sizes)
    where["load_average_end"] = round(os.getloadavg()[0], 2)
    report = _rounded({"measured_on": where, "sizes": dataclasses.asdict(sizes), "quick": preset is QUICK,
                       "seconds": time.perf_counter() - started, "ratios": _ratios(results), **results})
    print("\n".join(_table(results)))
    print(f"  ratios are project / bare throughput, fastest of {sizes.repeats} interleaved round(s); "
          f"{report['seconds']:.0f} s in all; 1-min load average {where['load_average_start']} at the start, "
          f"{where['load_average_end']} at the end, on {where['cpus']} CPUs")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"  results: {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
