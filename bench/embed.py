"""Embed throughput: the Ray pipeline against a bare in-process loop over the same images, in one run.

Both use the real ViT-B-32 (CLIP role) and DINOv2-small (reference role) architectures with random weights,
the same compute as the real checkpoints. The bare loop reads, decodes, preprocesses and runs both models
one batch after another with all the machine's threads; the pipeline runs the same work through Ray Data
(decode as CPU tasks; one actor pool whose actors host both models, or with ``--pools per_model`` one pool per
model) with the same CPU budget.

The pipeline is timed on two corpus sizes, so the fixed start-up cost (actor start, model load) and the
steady-state throughput separate: time(n) = start-up + n / throughput.

    python bench/embed.py [--images N] [--small N] [--batch-size B] [--clip SPEC] [--reference SPEC]

``--multi SPEC --multi SPEC ...`` measures the other case: M CLIP-role models audited in one run. The embed stage
decodes each image once and runs every model's preprocessing and forward; its total time is compared with the
sum of M bare in-process loops (each model's preprocessing and forward over already-decoded images, all the
machine's threads) plus one bare decode pass (goal: at most 1.1 x that sum). Each model actor gets all the
machine's threads by default here: with ``--pools per_model`` the M pools run at once and finish at different
times, and a pool that has finished leaves its cores to the others; with shared pools (the default) one actor runs
the M models one after another, as the bare loops do.
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

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"


def image_paths(count: int, scratch: Path) -> tuple[list[str], str]:
    """(paths, source): the shared Flickr8k sample where it has ``count`` images (``flickr8k``), else generated
    224 px probe scenes (``synthetic``)."""
    if FLICKR.is_dir():
        paths = sorted(str(p) for p in FLICKR.glob("*.jpg"))
        if len(paths) >= count:
            return paths[:count], "flickr8k"
    from clipaudit.probe.scenes import make_scene

    paths = []
    for index in range(count):
        image, _ = make_scene(0, index)
        path = scratch / f"scene_{index}.png"
        image.save(path)
        paths.append(str(path))
    return paths, "synthetic"


def bare_loop(paths: list[str], models: dict, batch_size: int, threads: int) -> float:
    """Seconds for read + decode + preprocess + both forwards, in this process, batch after batch."""
    import torch

    from clipaudit.io.images import decode_image, read_image_bytes

    torch.set_num_threads(threads)
    loaded = {role: model.load("cpu") for role, model in models.items()}
    warm = [models[r].preprocess(decode_image(read_image_bytes(paths[0]), 10**9)) for r in models]
    for role, pixels in zip(models, warm):
        loaded[role].encode_images(pixels[None])
    start = time.perf_counter()
    for offset in range(0, len(paths), batch_size):
        images = [decode_image(read_image_bytes(p), 10**9) for p in paths[offset:offset + batch_size]]
        for role, model in models.items():
            loaded[role].encode_images(np.stack([model.preprocess(image) for image in images]))
    return time.perf_counter() - start


def pipeline(paths: list[str], models: dict, embed, ray_config, scratch: Path, name: str) -> float:
    """Seconds for the embed stage's image pass through Ray, start-up included."""
    from clipaudit.io.tables import RunTables
    from clipaudit.records import SAMPLES, SAMPLES_SCHEMA, Sample, StageStats, samples_to_table
    from clipaudit.runtime import RayRunner
    from clipaudit.stages.embed import embed_images

    tables = RunTables(str(scratch / name))
    samples = [Sample(image_id=f"{i:06d}", uri=p, captions=["x"], caption="x", source="bench")
               for i, p in enumerate(paths)]
    tables.insert_new(SAMPLES, samples_to_table(samples), "image_id", SAMPLES_SCHEMA)
    start = time.perf_counter()
    embed_images(tables, RayRunner(ray_config), models, embed, StageStats("embed"))
    return time.perf_counter() - start


def bare_parts(paths: list[str], models: dict, batch_size: int, threads: int) -> dict[str, float]:
    """Seconds of one decode pass (read + decode) and of each model's preprocess + forward loop over the decoded
    images, each measured on its own in this process."""
    import torch

    from clipaudit.io.images import decode_image, read_image_bytes

    torch.set_num_threads(threads)
    start = time.perf_counter()
    images = [decode_image(read_image_bytes(p), 10**9) for p in paths]
    parts = {"decode": time.perf_counter() - start}
    for slot, model in models.items():
        loaded = model.load("cpu")
        loaded.encode_images(model.preprocess(images[0])[None])
        start = time.perf_counter()
        for offset in range(0, len(images), batch_size):
            loaded.encode_images(np.stack([model.preprocess(image) for image in images[offset:offset + batch_size]]))
        parts[slot] = time.perf_counter() - start
        del loaded
    return parts


def multi_model(args: argparse.Namespace) -> None:
    """The M-model case: the embed stage over M CLIP-role models against M bare loops plus one decode pass."""
    import ray

    from clipaudit.config import EmbedConfig, ModelsConfig, RayConfig
    from clipaudit.models import resolve_model

    slots = ModelsConfig(clip=list(args.multi)).clip_slots
    models = {slot: resolve_model(spec, "clip") for slot, spec in slots.items()}
    embed = EmbedConfig(batch_size=args.batch_size, cpus_per_actor=min(0.5, args.cpus / (2 * len(models))),
                        write_every=4096, torch_threads=args.threads or args.cpus, actor_pools=args.pools)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        paths, source = image_paths(args.images, scratch)
        parts = bare_parts(paths, models, args.batch_size, args.cpus)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().print_on_execution_start = False
        ray.data.DataContext.get_current().issue_detectors_config.detectors = []
        small_s = pipeline(paths[:args.small], models, embed, RayConfig(), scratch, "small")
        full_s = pipeline(paths, models, embed, RayConfig(), scratch, "full")
        ray.shutdown()
    bare_s = sum(parts.values())
    steady_s = (full_s - small_s) * len(paths) / max(len(paths) - args.small, 1)
    result = {
        "case": f"M={len(models)} CLIP-role models", "images": len(paths),
        "source": source, "models": list(slots.values()), "cpus": args.cpus,
        "batch_size": args.batch_size, "bare_seconds": {k: round(v, 2) for k, v in parts.items()},
        "bare_sum_s": round(bare_s, 2), "pipeline_end_to_end_s": round(full_s, 2),
        "pipeline_steady_s": round(steady_s, 2), "end_to_end_ratio": round(full_s / bare_s, 3),
        "steady_ratio": round(steady_s / bare_s, 3),
    }
    print(f"embed benchmark, {result['case']}: {len(paths)} images ({result['source']}), {args.cpus} CPUs, "
          f"batch {args.batch_size}")
    print("  bare: decode pass {:.1f} s + forwards {} = {:.1f} s".format(
        parts["decode"], " + ".join(f"{parts[slot]:.1f}" for slot in models), bare_s))
    print(f"  pipeline, steady state (start-up removed) {steady_s:8.1f} s   ratio {result['steady_ratio']:.2f} "
          "(goal <= 1.1)")
    print(f"  pipeline, end to end                      {full_s:8.1f} s   ratio {result['end_to_end_ratio']:.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"embed-m{len(models)}.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--small", type=int, default=48, help="the smaller corpus, for the start-up cost")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clip", default="open_clip:ViT-B-32/random")
    parser.add_argument("--reference", default="hf-random:dinov2-small")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per actor (0: the config's default, one per model an actor hosts; with "
                             "--multi, cpus: the pools share the cores)")
    parser.add_argument("--pools", choices=["shared", "per_model"], default="shared",
                        help="embed.actor_pools: one pool whose actors host both models (the default), or one each")
    parser.add_argument("--multi", action="append", default=[], metavar="SPEC",
                        help="a CLIP-role model of the M-model case (repeat; runs that case instead)")
    args = parser.parse_args()
    if args.multi:
        multi_model(args)
        return

    import ray

    from clipaudit.config import EmbedConfig, RayConfig
    from clipaudit.models import resolve_model

    models = {"clip": resolve_model(args.clip, "clip"), "reference": resolve_model(args.reference, "reference")}
    embed = EmbedConfig(batch_size=args.batch_size, cpus_per_actor=min(0.5, args.cpus / 4), write_every=4096,
                        torch_threads=args.threads, actor_pools=args.pools)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        paths, source = image_paths(args.images, scratch)
        bare_s = bare_loop(paths, models, args.batch_size, args.cpus)
        init_start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().print_on_execution_start = False
        init_s = time.perf_counter() - init_start
        small_s = pipeline(paths[:args.small], models, embed, RayConfig(), scratch, "small")
        full_s = pipeline(paths, models, embed, RayConfig(), scratch, "full")
        ray.shutdown()

    bare_rate = len(paths) / bare_s
    steady_rate = (len(paths) - args.small) / max(full_s - small_s, 1e-9)
    startup_s = max(small_s - args.small / steady_rate, 0.0)
    end_to_end_rate = len(paths) / full_s
    result = {
        "images": len(paths), "source": source,
        "models": {"clip": args.clip, "reference": args.reference}, "actor_pools": args.pools, "cpus": args.cpus,
        "batch_size": args.batch_size, "bare_img_per_s": round(bare_rate, 2),
        "pipeline_steady_img_per_s": round(steady_rate, 2), "pipeline_end_to_end_img_per_s": round(end_to_end_rate, 2),
        "steady_ratio": round(steady_rate / bare_rate, 3), "end_to_end_ratio": round(end_to_end_rate / bare_rate, 3),
        "pipeline_startup_s": round(startup_s, 1), "ray_init_s": round(init_s, 1),
    }
    print(f"embed benchmark: {len(paths)} images ({result['source']}), {args.clip} + {args.reference}, "
          f"{args.cpus} CPUs, batch {args.batch_size}, actor_pools {args.pools}")
    print(f"  bare in-process loop        {bare_rate:8.2f} img/s")
    print(f"  Ray pipeline, steady state  {steady_rate:8.2f} img/s   ratio {result['steady_ratio']:.2f} (goal >= 0.9)")
    print(f"  Ray pipeline, end to end    {end_to_end_rate:8.2f} img/s   ratio {result['end_to_end_ratio']:.2f} "
          "(goal >= 0.85 at 1000 images)")
    print(f"  fixed start-up per run      {startup_s:8.1f} s  (+ ray.init {init_s:.1f} s once)")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "embed.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
