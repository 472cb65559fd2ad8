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
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECTIONS = ("embed", "tcac", "knn")
KNN_MARGIN = 10


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


# ---------------------------------------------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _best_rounds(paths: dict[str, Callable[[], Any]], device: str, repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` rounds of each path, the paths interleaved within each round."""
    best = {name: math.inf for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _ratio(project_rate: float, bare_rate: float) -> float:
    return project_rate / bare_rate if bare_rate > 0 else math.nan


def _random_images(count: int, seed: int = 0):
    """``count`` generated 500 x 375 RGB scenes (a background and four rectangles)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = np.empty((375, 500, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        for _ in range(4):
            x, y = int(rng.integers(0, 400)), int(rng.integers(0, 300))
            pixels[y:y + 80, x:x + 100] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(pixels))
    return images


def _module_of(loaded: Any) -> Any:
    """The ``nn.Module`` inside a model the registry loaded (open_clip and transformers backends)."""
    module = getattr(loaded, "_model", None)
    if module is None or not hasattr(module, "parameters"):
        raise SystemExit(f"{loaded.spec}: not an open_clip or transformers model; the bare loop needs its module")
    return module


def _image_forward(module: Any) -> Callable[[Any], Any]:
    """The image tower's forward of a module: open_clip ``encode_image``, transformers CLIP
    ``get_image_features``, DINOv2 the layernormed CLS token (``pooler_output``): what the backends call."""
    if hasattr(module, "encode_image"):
        return module.encode_image
    if hasattr(module, "get_image_features"):
        return lambda x: module.get_image_features(pixel_values=x).pooler_output
    return lambda x: module(pixel_values=x).pooler_output


def _unit_rows_on_host(tensor: Any) -> np.ndarray:
    import torch

    return torch.nn.functional.normalize(tensor.float(), dim=-1).cpu().numpy()


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _peak_memory_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------------- embed


def embed_section(spec: str, role: str, device: str, sizes: Sizes) -> dict[str, Any]:
    """One model's embed forward: the project's ImageEncoder against a bare loop of the same module."""
    import torch

    from clipaudit.batches.embed import OK, ImageEncoder
    from clipaudit.models import resolve_model

    resolved = resolve_model(spec, role)
    _reset_peak(device)
    encoder = ImageEncoder(resolved, role, device)
    module = _module_of(encoder.model)
    dtype = next(module.parameters()).dtype
    forward = _image_forward(module)

    distinct = np.stack([resolved.preprocess(image) for image in _random_images(min(8, sizes.images))])
    batches = [distinct[np.arange(start, min(start + sizes.batch_size, sizes.images)) % len(distinct)]
               for start in range(0, sizes.images, sizes.batch_size)]
    resident = [torch.from_numpy(b).to(device=device, dtype=dtype) for b in batches]
    rejected = [0]

    def project_batch(pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        out = encoder({"image_id": np.arange(n).astype(str).astype(object), "status": np.full(n, OK, dtype=object),
                       "detail": np.full(n, "", dtype=object), f"need_{role}": np.ones(n, dtype=bool),
                       f"pixels_{role}": pixels})
        rejected[0] += int((out["status"] != OK).sum())
        return out[f"vector_{role}"]

    def bare_batch(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return _unit_rows_on_host(forward(torch.from_numpy(pixels).to(device).to(dtype)))

    def forward_only() -> None:
        with torch.inference_mode():
            for x in resident:
                forward(x)

    for pixels in batches[:sizes.warmup]:
        project_batch(pixels)
        bare_batch(pixels)
    with torch.inference_mode():
        for x in resident[:sizes.warmup]:
            forward(x)
    agreement = float(np.min(np.sum(project_batch(batches[0]) * bare_batch(batches[0]), axis=1)))
    rejected[0] = 0
    seconds = _best_rounds({"project": lambda: [project_batch(b) for b in batches],
                            "bare": lambda: [bare_batch(b) for b in batches],
                            "forward_only": forward_only}, device, sizes.repeats)
    rates = {name: sizes.images / s for name, s in seconds.items()}
    result = {
        "spec": resolved.spec, "role": role, "dim": encoder.model.dim, "model_dtype": str(dtype).removeprefix("torch."),
        "images": sizes.images, "batch_size": sizes.batch_size, "input_size": resolved.preprocess.image_size,
        "project_img_per_s": rates["project"], "bare_img_per_s": rates["bare"],
        "forward_only_img_per_s": rates["forward_only"], "ratio": _ratio(rates["project"], rates["bare"]),
        "ratio_to_forward_only": _ratio(rates["project"], rates["forward_only"]),
        "min_cosine_project_vs_bare": agreement, "rejected_rows_timed": rejected[0],
        "peak_device_mb": _peak_memory_mb(device),
    }
    return result


# ---------------------------------------------------------------------------------------------------- tcac


def _normaliser(preprocess: Any, device: str) -> Callable[[Any], Any]:
    """uint8 ``(N, 3, S, S)`` squares -> float32 model inputs on the device, as ``Preprocess`` computes them."""
    import torch

    if preprocess.kind != "normalize":
        raise SystemExit("the bare TCAC loop needs a model whose preprocessing normalises (open_clip or hf)")
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    if preprocess.style == "transformers":
        return lambda squares: (squares.float() - mean * 255.0) / (std * 255.0)
    return lambda squares: (squares.float() / 255.0 - mean) / std


def tcac_section(spec: str, device: str, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    """The CLIP actor of the tcac stage against a bare loop of the same transform kernels, crop and forward."""
    import torch

    from clipaudit.batches.embed import OK
    from clipaudit.batches.tcac import TransformedEncoder, images_per_task, prepare_resized
    from clipaudit.config import EmbedConfig, TcacConfig
    from clipaudit.model_view import center_crop_or_pad
    from clipaudit.models import resolve_model
    from clipaudit.transforms import transform_batch

    resolved = resolve_model(spec, "clip")
    tcac = TcacConfig()
    names = list(tcac.transforms)
    per_batch = images_per_task(sizes.tcac_batch, len(names))
    paths = []
    for i, image in enumerate(_random_images(min(16, sizes.tcac_images), seed=1)):
        path = scratch / f"tcac_{i:02d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    batches = []
    for start in range(0, sizes.tcac_images, per_batch):
        ids = np.asarray([f"img{i:06d}" for i in range(start, min(start + per_batch, sizes.tcac_images))],
                         dtype=object)
        uris = np.asarray([paths[i % len(paths)] for i in range(start, start + len(ids))], dtype=object)
        batch = prepare_resized({"image_id": ids, "uri": uris, "transforms": np.full(len(ids), ",".join(names))},
                                resolved.preprocess, tcac, EmbedConfig().max_pixels)
        if not (batch["status"] == OK).all():
            raise SystemExit(f"prepare_resized rejected a generated image: {batch['detail']}")
        batches.append(batch)
    rows = sizes.tcac_images * len(names)

    _reset_peak(device)
    encoder = TransformedEncoder(resolved, tcac, device)
    module = _module_of(encoder.model)
    dtype = next(module.parameters()).dtype
    forward = _image_forward(module)
    normalise = _normaliser(resolved.preprocess, device)
    size, style = resolved.preprocess.image_size, resolved.preprocess.style
    phases = {"transform": 0.0, "infer": 0.0}
    rejected = [0]

    def project_batch(batch: dict[str, np.ndarray]) -> np.ndarray:
        out = encoder(dict(batch))
        phases["transform"] += float(out["t_transform"].sum())
        phases["infer"] += float(out["t_infer_clip"].sum())
        rejected[0] += int((out["status"] != OK).sum())
        return out["vector_clip"]

    def bare_batch(batch: dict[str, np.ndarray]) -> np.ndarray:
        """Vectors in the project's row order (image-major, then transform)."""
        drawn = [json.loads(p) for p in batch["params"]]
        pixels = list(batch["pixels"])
        if len({p.shape for p in pixels}) != 1:
            raise SystemExit("the bare TCAC loop expects images of one size")
        with torch.inference_mode():
            stack = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device)
            squares = []
            for t, name in enumerate(names):
                outputs = transform_batch(stack, name, [d[t] for d in drawn], tcac.params)
                squares.extend(center_crop_or_pad(o, size, style) for o in outputs)
            vectors = _unit_rows_on_host(forward(normalise(torch.stack(squares)).to(dtype)))
        n = len(pixels)
        return vectors.reshape(len(names), n, -1).transpose(1, 0, 2).reshape(n * len(names), -1)

    for batch in batches[:1]:
        project_batch(batch)
        bare_batch(batch)
    agreement = float(np.min(np.sum(project_batch(batches[0]) * bare_batch(batches[0]), axis=1)))
    phases.update(transform=0.0, infer=0.0)
    rejected[0] = 0
    seconds = _best_rounds({"project": lambda: [project_batch(b) for b in batches],
                            "bare": lambda: [bare_batch(b) for b in batches]}, device, sizes.repeats)
    rates = {name: rows / s for name, s in seconds.items()}
    spent = phases["transform"] + phases["infer"]
    result = {
        "spec": resolved.spec, "model_dtype": str(dtype).removeprefix("torch."), "images": sizes.tcac_images,
        "transforms": names, "rows": rows, "rows_per_batch": per_batch * len(names), "input_size": size,
        "project_rows_per_s": rates["project"], "bare_rows_per_s": rates["bare"],
        "ratio": _ratio(rates["project"], rates["bare"]),
        "project_transform_share": phases["transform"] / spent if spent else math.nan,
        "min_cosine_project_vs_bare": agreement, "rejected_rows_timed": rejected[0],
        "peak_device_mb": _peak_memory_mb(device),
    }
    return result


# ---------------------------------------------------------------------------------------------------- knn


def _unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _bare_topk(queries: np.ndarray, corpus: np.ndarray, k: int, device: str, dtype: Any,
               self_search: bool) -> np.ndarray:
    """Ids of the top-k of each query row by ``torch.mm`` + ``torch.topk`` over blocks of rows (the row itself
    left out when ``self_search``); the similarity block held at most about 1 GiB (CUDA) or 256 MiB (CPU)."""
    import torch

    with torch.inference_mode():
        c = torch.from_numpy(corpus).to(device=device, dtype=dtype)
        q = c if self_search else torch.from_numpy(queries).to(device=device, dtype=dtype)
        budget = 2**30 if device.startswith("cuda") else 2**28
        rows = max(1, budget // (c.shape[0] * c.element_size()))
        ids = torch.empty((q.shape[0], k), dtype=torch.int64, device=device)
        for start in range(0, q.shape[0], rows):
            block = q[start:start + rows] @ c.T
            if self_search:
                local = torch.arange(block.shape[0], device=device)
                block[local, local + start] = -math.inf
            ids[start:start + rows] = torch.topk(block, k, dim=1).indices
        return ids.cpu().numpy()


def _id_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each row's ids in ``a`` that are also in the row of ``b``."""
    return float((a[:, :, None] == b[:, None, :]).any(axis=2).mean())


def knn_section(device: str, sizes: Sizes) -> dict[str, Any]:
    """Exact self and cross top-k of the project against a bare matmul + topk, in the dtype of the products."""
    import torch

    from clipaudit import knn

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    k, n, d = sizes.k, sizes.knn_n, sizes.knn_dim
    corpus = _unit_vectors(n, d, seed=0)
    queries = _unit_vectors(sizes.knn_queries, d, seed=1)
    wide = min(n - 1, k + KNN_MARGIN)
    saved = None
    if device.startswith("cuda"):
        saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    _reset_peak(device)
    try:
        warm = corpus[:min(n, 2048)]
        knn.self_topk_exact(warm, k, margin=KNN_MARGIN, device=device)
        knn.cross_topk_exact(queries[:256], warm, k, margin=KNN_MARGIN, device=device)
        _bare_topk(warm, warm, k, device, dtype, True)
        _bare_topk(queries[:256], warm, k, device, dtype, False)
        out: dict[str, Any] = {}

        def self_project() -> None:
            out["self_project"] = knn.self_topk_exact(corpus, k, margin=KNN_MARGIN, device=device)

        def self_bare() -> None:
            out["self_bare"] = _bare_topk(corpus, corpus, k, device, dtype, True)

        def cross_project() -> None:
            out["cross_project"] = knn.cross_topk_exact(queries, corpus, k, margin=KNN_MARGIN, device=device)

        def cross_bare() -> None:
            out["cross_bare"] = _bare_topk(queries, corpus, k, device, dtype, False)

        seconds = _best_rounds({"self_project": self_project, "self_bare": self_bare,
                                "cross_project": cross_project, "cross_bare": cross_bare}, device, sizes.repeats)
        _sync(device)
        start = time.perf_counter()
        cand, lowp = knn.self_topk(corpus, wide, device=device)
        _sync(device)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        knn.refine_self(corpus, cand, lowp, k, dtype, exact=lambda q, c, kk, excl: knn.cross_topk(
            q, c, kk, exclude=excl, device=device, dtype=torch.float32))
        refine_s = time.perf_counter() - start
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = saved
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "k": k, "margin": KNN_MARGIN, "dim": d,
                              "peak_device_mb": _peak_memory_mb(device)}
    for kind, queries_n in (("self", n), ("cross", sizes.knn_queries)):
        project_rate = queries_n / seconds[f"{kind}_project"]
        bare_rate = queries_n / seconds[f"{kind}_bare"]
        result[kind] = {
            "queries": queries_n, "corpus": n, "project_queries_per_s": project_rate,
            "bare_queries_per_s": bare_rate, "ratio": _ratio(project_rate, bare_rate),
            "searched_again": int(out[f"{kind}_project"][2]),
            "id_overlap_project_vs_bare": _id_overlap(out[f"{kind}_project"][0], out[f"{kind}_bare"]),
        }
    result["self"]["refine_share"] = refine_s / (search_s + refine_s)
    _release(device)
    return result


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
