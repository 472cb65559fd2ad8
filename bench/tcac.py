"""TCAC throughput: transformed images scored per second through the pipeline (Ray: decode once and transform
as CPU tasks, the CLIP actor pool for the forwards) against a bare in-process loop with the same model, in one
run; and the text encodings the pipeline needed against the unique captions (goal: equal, each caption once).

Both sides start from the same run directory state: samples ingested (the shared Flickr8k sample with its real
captions where present, else generated scenes) and embedded by the embed stage (image and caption vectors),
so both reuse the stored original and caption vectors. The bare loop builds the same caption pools, then reads,
decodes, transforms, preprocesses, embeds (batches of --batch-size) and scores one image after another with
--threads torch threads, the same as the pipeline's CLIP actor (default: half the CPUs; the pipeline's CPU tasks
run beside the actor, which is the overlap it exists for). The pipeline is timed on two corpus sizes, so its
fixed start-up (actor start, model load) and its steady-state throughput separate:
time(n) = start-up + n / throughput. Timings on a shared machine move with its load: the load average is printed.

    python bench/tcac.py [--images N] [--small N] [--batch-size B] [--clip SPEC] [--cpus N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def dataset_config(count: int, scratch: Path):
    """The shared Flickr8k sample (first ``count`` images) where present, else ``count`` synthetic scenes."""
    from clipaudit.config import DatasetConfig

    token = FLICKR / "Flickr8k.token.txt"
    if token.is_file() and (FLICKR / "images").is_dir():
        return DatasetConfig(format="flickr8k", captions=str(token), images=str(FLICKR / "images"), limit=count)
    return DatasetConfig(format="synthetic", num_images=count, images=str(scratch / "synthetic"))


def prepare(config, model, ray_config):
    """Ingest and embed (CLIP images and captions) a run directory; returns its tables and the embed stats."""
    from clipaudit.io.tables import RunTables
    from clipaudit.runtime import RayRunner
    from clipaudit.stages.embed import run_embed
    from clipaudit.stages.ingest import run_ingest

    tables = RunTables(config.run_dir)
    run_ingest(config, tables)
    stats = run_embed(tables, RayRunner(ray_config, config.embed), {"clip": model}, config.embed)
    return tables, stats


def bare_loop(tables, model, config, threads: int) -> tuple[float, int]:
    """Seconds and (image, transform) pairs for pools + read + decode + transform + preprocess + forward + scoring,
    in this process, batch after batch."""
    import torch

    from clipaudit.records import SAMPLES, StageStats
    from clipaudit.runtime import LocalRunner
    from clipaudit.stages.embed_batches import decode_image, read_image_bytes
    from clipaudit.stages.tcac import load_corpus, load_originals
    from clipaudit.tcac_scoring import caption_pools, compare, pool_probabilities
    from clipaudit.transforms import transform_image

    torch.set_num_threads(threads)
    tcac = config.tcac
    loaded = model.load("cpu")
    samples = tables.read(SAMPLES, ["image_id", "uri", "captions", "caption"]).to_pylist()
    first = decode_image(read_image_bytes(samples[0]["uri"]), 10**9)
    loaded.encode_images(model.preprocess(first)[None])
    start = time.perf_counter()
    corpus = load_corpus(tables, tables.read(SAMPLES), LocalRunner(), model, config.embed, StageStats("bench"))
    pools = caption_pools(corpus, {s["image_id"]: corpus.rows(s["captions"]) for s in samples}, tcac.pool_neighbours)
    originals = load_originals(tables, model.spec, {s["image_id"] for s in samples})
    pending: list[tuple[str, np.ndarray]] = []
    pairs = 0

    def score(rows: list[tuple[str, np.ndarray]]) -> int:
        vectors = loaded.encode_images(np.stack([pixels for _, pixels in rows]))
        for (image_id, _), vector in zip(rows, vectors):
            pool = pools[image_id]
            probs = pool_probabilities(np.stack([originals[image_id], vector]), corpus.vectors[pool],
                                       loaded.logit_scale)
            compare(probs[0], probs[1], tcac.top_k, 0)
        return len(rows)

    for sample in samples:
        image = decode_image(read_image_bytes(sample["uri"]), config.embed.max_pixels)
        for name in tcac.transforms:
            transformed, _ = transform_image(image, name, tcac.params, tcac.seed, sample["image_id"])
            pending.append((sample["image_id"], model.preprocess(transformed)))
            if len(pending) == config.embed.batch_size:
                pairs += score(pending)
                pending = []
    if pending:
        pairs += score(pending)
    return time.perf_counter() - start, pairs


def pipeline(tables, model, config, ray_config) -> tuple[float, object]:
    """Seconds for the tcac stage through Ray, start-up included, and its stats."""
    from clipaudit.runtime import RayRunner
    from clipaudit.stages.tcac import run_tcac

    start = time.perf_counter()
    stats = run_tcac(config, tables, RayRunner(ray_config, config.embed), model)
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--small", type=int, default=12, help="the smaller corpus, for the start-up cost")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clip", default="open_clip:ViT-B-32/random")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the bare loop and of the pipeline's CLIP actor (0: half the CPUs)")
    args = parser.parse_args()
    threads = args.threads or max(1, args.cpus // 2)

    import ray

    from clipaudit.config import Config, EmbedConfig, RayConfig
    from clipaudit.models import resolve_model

    model = resolve_model(args.clip, "clip")
    embed = EmbedConfig(batch_size=args.batch_size, cpus_per_actor=min(0.5, args.cpus / 4), write_every=4096,
                        torch_threads=threads)
    ray_config = RayConfig(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs = {}
        for name, count in (("small", args.small), ("full", args.images)):
            config = Config(run_dir=str(scratch / name), dataset=dataset_config(count, scratch), embed=embed)
            config = replace(config, models=replace(config.models, clip=args.clip))
            tables, embed_stats = prepare(config, model, ray_config)
            runs[name] = (config, tables, embed_stats)
        small_s, _ = pipeline(runs["small"][1], model, runs["small"][0], ray_config)
        full_s, stats = pipeline(runs["full"][1], model, runs["full"][0], ray_config)
        ray.shutdown()
        config, tables, embed_stats = runs["full"]
        bare_s, bare_pairs = bare_loop(tables, model, config, threads)
        caption_rows = sum(len(c or []) for c in tables.read("samples", ["captions"]).column("captions").to_pylist())

    transforms = len(config.tcac.transforms)
    pairs = stats.counts["pairs_written"]
    small_pairs = args.small * transforms
    bare_rate = bare_pairs / bare_s
    steady_rate = (pairs - small_pairs) / max(full_s - small_s, 1e-9)
    end_to_end_rate = pairs / full_s
    startup_s = max(small_s - small_pairs / steady_rate, 0.0)
    embed_texts = embed_stats.counts.get("captions_todo", 0)
    tcac_texts = stats.counts["text_encodings"]
    unique = stats.counts["unique_captions"]
    result = {
        "images": args.images, "transforms": transforms, "pairs": pairs, "bare_pairs": bare_pairs,
        "source": "flickr8k" if config.dataset.format == "flickr8k" else "synthetic", "model": args.clip,
        "cpus": args.cpus, "torch_threads": threads, "load_average": round(os.getloadavg()[0], 2),
        "batch_size": args.batch_size, "bare_img_per_s": round(bare_rate, 2),
        "pipeline_steady_img_per_s": round(steady_rate, 2), "pipeline_end_to_end_img_per_s": round(end_to_end_rate, 2),
        "steady_ratio": round(steady_rate / bare_rate, 3), "end_to_end_ratio": round(end_to_end_rate / bare_rate, 3),
        "pipeline_startup_s": round(startup_s, 1),
        "text_encodings_embed": embed_texts, "text_encodings_tcac": tcac_texts, "unique_captions": unique,
        "caption_rows": caption_rows,
    }
    print(f"tcac benchmark: {args.images} images ({result['source']}) x {transforms} transforms = {pairs} "
          f"transformed images, {args.clip}, {args.cpus} CPUs, batch {args.batch_size}")
    print(f"  bare in-process loop        {bare_rate:8.2f} transformed img/s  ({threads} torch threads)")
    print(f"  Ray pipeline, steady state  {steady_rate:8.2f} transformed img/s  ratio {result['steady_ratio']:.2f}")
    print(f"  Ray pipeline, end to end    {end_to_end_rate:8.2f} transformed img/s  ratio "
          f"{result['end_to_end_ratio']:.2f}")
    print(f"  fixed start-up per run      {startup_s:8.1f} s   (1-min load average at the end: "
          f"{result['load_average']} on {os.cpu_count()} cores)")
    print(f"  text encodings: embed stage {embed_texts} + tcac stage {tcac_texts} = {embed_texts + tcac_texts} "
          f"for {unique} unique captions (goal: equal; {caption_rows} caption rows)")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tcac.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
