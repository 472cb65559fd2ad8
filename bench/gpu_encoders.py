"""bench/gpu.py's embed and tcac sections: the project's image encoders against bare loops of the same module."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gpu_measure import _best_rounds, _peak_memory_mb, _ratio, _reset_peak
from scenes import random_scenes

if TYPE_CHECKING:
    from gpu import Sizes


# ---------------------------------------------------------------------------------------------------- helpers


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

    distinct = np.stack([resolved.preprocess(image) for image in random_scenes(min(8, sizes.images))])
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
    for i, image in enumerate(random_scenes(min(16, sizes.tcac_images), seed=1)):
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

