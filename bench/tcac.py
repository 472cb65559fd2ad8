"""TCAC transforms, old path against new, per transform, in one run; then each transform's share of the stage.

Old path (before the transforms moved to the model actor): per image and transform, the
``torchvision.transforms.v2.functional`` kernel on the full-size decoded image, then the model's preprocessing
(resize, crop, normalise) of the result. New path: the image resized once for the model (before the crop; its
time shared by the image's rows), then per transform one batched call of
:func:`clipaudit.transforms.transform_batch` over the images of that size, the crop, and the model's
normalisation. Both start from the same decoded images (the shared Flickr8k sample where present, else generated
scenes of 500 x 375), on this process's CPU with --threads torch threads, and both yield the same model inputs
up to the resolution change. Reported: transformed images per second per transform, and new / old.

Then the tcac stage runs in-process (LocalRunner) with the CLIP model (default: ViT-B-32 with random weights, the
real compute) on --stage-images images, and each transform's seconds are given as a share of the stage's wall
time (goal: none above 25%). Timings on a shared machine move with its load: the load average is printed.

    python bench/tcac.py [--images N] [--stage-images N] [--batch-size B] [--clip SPEC] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scenes import random_scenes

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def load_images(count: int, scratch: Path) -> list[tuple[str, str]]:
    """(image_id, path) of ``count`` images: the Flickr8k sample's first ones, else generated 500 x 375 scenes."""
    folder = FLICKR / "images"
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
        if len(names) == count:
            return [(name, str(folder / name)) for name in names]
    out = []
    for i, image in enumerate(random_scenes(count)):
        path = scratch / f"scene_{i:03d}.jpg"
        image.save(path, quality=90)
        out.append((path.name, str(path)))
    return out


def old_apply(image, name: str, drawn: dict, params):
    """The per-image v2 functional kernels at full resolution, as TCAC applied them before this change."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    config = params.of(name)
    if name == "grayscale":
        return F.rgb_to_grayscale(image, num_output_channels=3)
    if name == "hflip":
        return F.horizontal_flip(image) if drawn["applied"] else image
    if name == "invert":
        return F.invert(image) if drawn["applied"] else image
    mode, fill = InterpolationMode(config.interpolation), [float(config.fill)] * 3
    if name == "rotation":
        return F.rotate(image, drawn["angle"], interpolation=mode, expand=config.expand, fill=fill)
    if name == "affine":
        return F.affine(image, angle=drawn["angle"], translate=drawn["translate"], scale=drawn["scale"],
                        shear=drawn["shear"], interpolation=mode, fill=fill)
    if name == "perspective":
        if not drawn["applied"]:
            return image
        return F.perspective(image, drawn["startpoints"], drawn["endpoints"], interpolation=mode, fill=fill)
    height, width = image.shape[-2:]
    generator = torch.Generator().manual_seed(drawn["field_seed"])
    kernel = int(8 * config.sigma + 1)
    kernel += 1 - kernel % 2
    parts = []
    for extent in (width, height):
        d = torch.rand(1, 1, height, width, generator=generator) * 2 - 1
        parts.append(F.gaussian_blur(d, [kernel, kernel], [config.sigma, config.sigma]) * config.alpha / extent)
    return F.elastic(image, torch.concat(parts, 1).permute([0, 2, 3, 1]), interpolation=mode, fill=fill)


def old_path(images, preprocess, tcac, name: str) -> float:
    """Seconds for the old path of transform ``name`` over ``images`` (id, PIL image)."""
    from torchvision.transforms.v2 import functional as F

    from clipaudit.transforms import generator_for, sample_params

    start = time.perf_counter()
    for image_id, image in images:
        tensor = F.pil_to_tensor(image)
        drawn = sample_params(name, tcac.params, tensor.shape[-2], tensor.shape[-1],
                              generator_for(tcac.seed, image_id, name))
        preprocess(F.to_pil_image(old_apply(tensor, name, drawn, tcac.params).contiguous()))
    return time.perf_counter() - start


def new_path(resized, preprocess, tcac, name: str, batch_size: int) -> float:
    """Seconds for the new path of transform ``name``: batched transform + crop + normalisation of the resized
    images (id, H x W x 3 uint8), grouped by size in batches of ``batch_size``."""
    import torch

    from clipaudit.model_view import center_crop_or_pad, model_inputs
    from clipaudit.transforms import generator_for, sample_params, transform_batch

    start = time.perf_counter()
    groups: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for image_id, pixels in resized:
        groups.setdefault(pixels.shape, []).append((image_id, pixels))
    for shape, members in groups.items():
        for first in range(0, len(members), batch_size):
            chunk = members[first:first + batch_size]
            drawn = [sample_params(name, tcac.params, shape[0], shape[1], generator_for(tcac.seed, i, name))
                     for i, _ in chunk]
            stack = torch.from_numpy(np.stack([p for _, p in chunk])).permute(0, 3, 1, 2)
            outputs = transform_batch(stack, name, drawn, tcac.params)
            squares = torch.stack([center_crop_or_pad(o, preprocess.image_size, preprocess.style)
                                   for o in outputs])
            model_inputs(squares.permute(0, 2, 3, 1).numpy(), preprocess)
    return time.perf_counter() - start


def stage_shares(paths, clip: str, batch_size: int, threads: int, scratch: Path) -> dict[str, float]:
    """Run the tcac stage in-process over ``paths``; each transform's seconds as a share of its wall time."""
    from clipaudit.config import Config, EmbedConfig, ModelsConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import resolve_model
    from clipaudit.records import SAMPLES, SAMPLES_SCHEMA, Sample, samples_to_table
    from clipaudit.runtime import LocalRunner
    from clipaudit.stages.embed import run_embed
    from clipaudit.stages.tcac import run_tcac
    from clipaudit.transforms import TRANSFORM_NAMES

    embed = EmbedConfig(batch_size=batch_size, torch_threads=threads, write_every=4096)
    config = Config(run_dir=str(scratch / "stage"), models=ModelsConfig(clip=clip), embed=embed)
    tables = RunTables(config.run_dir)
    samples = [Sample(image_id=i, uri=p, captions=[f"a photo number {n}", f"picture {n} of something"],
                      caption=f"a photo number {n}", source="bench") for n, (i, p) in enumerate(paths)]
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    model = resolve_model(clip, "clip")
    run_embed(tables, LocalRunner(), {"clip": model}, embed)
    stats = run_tcac(config, tables, LocalRunner(), model)
    wall = stats.seconds["wall"]
    shares = {name: stats.seconds.get(f"transform_{name}", 0.0) / wall for name in TRANSFORM_NAMES}
    shares.update(resize=stats.seconds.get("resize", 0.0) / wall, forward=stats.seconds.get("infer_clip", 0.0) / wall,
                  wall_s=wall, pairs=stats.counts.get("pairs_written", 0))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--stage-images", type=int, default=24, help="images for the stage-share run (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clip", default="open_clip:ViT-B-32/random")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: half the CPUs)")
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)

    import torch

    from clipaudit.config import TcacConfig
    from clipaudit.io.images import decode_image, read_image_bytes
    from clipaudit.model_view import resize_for_model
    from clipaudit.models import resolve_model
    from clipaudit.transforms import TRANSFORM_NAMES

    torch.set_num_threads(threads)
    preprocess = resolve_model(args.clip, "clip").preprocess
    tcac = TcacConfig()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        paths = load_images(args.images, scratch)
        images = [(i, decode_image(read_image_bytes(p), 10**9)) for i, p in paths]
        start = time.perf_counter()
        resized = [(i, resize_for_model(image, preprocess)) for i, image in images]
        resize_share = (time.perf_counter() - start) / (len(TRANSFORM_NAMES) + 1)
        new_path(resized[:2], preprocess, tcac, "elastic", args.batch_size)
        rows = {}
        for name in TRANSFORM_NAMES:
            old_s = old_path(images, preprocess, tcac, name)
            new_s = new_path(resized, preprocess, tcac, name, args.batch_size) + resize_share
            rows[name] = {"old_img_per_s": round(len(images) / old_s, 1),
                          "new_img_per_s": round(len(images) / new_s, 1), "speedup": round(old_s / new_s, 2)}
        shares = stage_shares(paths[:args.stage_images], args.clip, args.batch_size, threads, scratch) \
            if args.stage_images else {}
    source = "flickr8k" if paths[0][1].startswith(str(FLICKR)) else "synthetic"
    result = {"images": len(images), "source": source, "model_input": preprocess.image_size, "clip": args.clip,
              "torch_threads": threads, "batch_size": args.batch_size, "load_average": round(os.getloadavg()[0], 2),
              "per_transform": rows, "stage_shares": {k: round(v, 4) for k, v in shares.items()}}
    print(f"tcac transforms: {len(images)} images ({source}), model input {preprocess.image_size} px, "
          f"{threads} torch threads, batch {args.batch_size}")
    print(f"  {'transform':12s} {'old img/s':>10s} {'new img/s':>10s} {'new/old':>8s}")
    for name, row in rows.items():
        print(f"  {name:12s} {row['old_img_per_s']:10.1f} {row['new_img_per_s']:10.1f} {row['speedup']:7.2f}x")
    if shares:
        print(f"  stage ({shares['pairs']} transformed images, {args.clip}, {shares['wall_s']:.1f} s wall), "
              "share of the stage's time:")
        print("   " + ", ".join(f"{name} {shares[name]:.1%}" for name in TRANSFORM_NAMES)
              + f"; resize {shares['resize']:.1%}; forward {shares['forward']:.1%}")
    print(f"  1-min load average at the end: {result['load_average']} on {os.cpu_count()} cores")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tcac.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
