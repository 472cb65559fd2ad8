"""The ``export`` and ``score`` subcommands: their arguments and what they run (entries of the CLI's table)."""

from __future__ import annotations

import argparse
import sys


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    """``clipaudit export RUN_DIR OUT_DIR [--images copy|reference] [--llm auto|off] [--clip-model SPEC]
    [--license TEXT] [--attribution TEXT] [--set K=V]``."""
    export = commands.add_parser(
        "export", help="write what an audit found as a benchmark folder (Parquet + dataset card)",
        description="Export a run's findings as a versioned benchmark folder: pairs.parquet (image pairs CLIP "
                    "confuses), invariance.parquet (TCAC probes), text_pairs.parquet (validated caption pairs), "
                    "README.md (dataset card), images/, and hf/pairs.parquet + hf/invariance.parquet (the same rows "
                    "with the images inline, for datasets.load_dataset(\"parquet\", ...)). RUN_DIR may be "
                    "RUN_DIR@RUN_ID.")
    export.add_argument("run", metavar="RUN_DIR", help="the run directory to export")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the benchmark folder to write")
    export.add_argument("--images", choices=("copy", "reference"), default="copy",
                        help="copy the images into OUT_DIR/images/ (default) or write their URIs")
    export.add_argument("--llm", choices=("auto", "off"), default="auto",
                        help="auto: where the run's LLM stages ran, ask its LLM (llm.* of the run's config) for "
                             "two distinguishing captions per pair, cached in llm_calls; off: never ask")
    export.add_argument("--clip-model", dest="clip_model", metavar="SPEC",
                        help="which CLIP-role model's findings to export, for a run of several (a spec of its "
                             "models.clip, as written there); default: the first")
    export.add_argument("--license", metavar="TEXT",
                        help="the images' licence, for the license column of hf/*.parquet and the dataset card, "
                             "where the run's samples table has no license column value (default: the source "
                             "corpus's known terms, e.g. Flickr8k's, else none)")
    export.add_argument("--attribution", metavar="TEXT",
                        help="the images' attribution (credit line), likewise for the attribution column")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's config for the LLM requests (llm.dry_run=true); "
                             "repeatable")
    export.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_export(args: argparse.Namespace) -> int:
    """Run ``clipaudit export``."""
    from clipaudit.benchmark.export import export_benchmark

    manifest = export_benchmark(args.run, args.out_dir, images=args.images, llm=args.llm, overrides=args.overrides,
                                clip_model=args.clip_model, license=args.license, attribution=args.attribution)
    counts = manifest["counts"]
    print(f"exported to {args.out_dir}: {sum(counts['pairs'].values())} image pairs "
          f"({sum(counts['pairs_left_out'].values())} left out: their captions do not tell them apart), "
          f"{sum(counts['invariance'].values())} invariance probes, {sum(counts['text_pairs'].values())} text pairs, "
          f"{counts['llm_captions']} with LLM captions")
    return 0


def add_score_parser(commands: argparse._SubParsersAction) -> None:
    """``clipaudit score BENCH_DIR --model SPEC [--model SPEC ...] [--json OUT] [--clip-benchmark-dir DIR]
    [--runner ray|local]``."""
    score = commands.add_parser(
        "score", help="score image-text models on a benchmark folder",
        description="Pair accuracy (MMVP), invariance rate per transform and text-pair separation rate, each with "
                    "a bootstrap 95%% interval, for every --model.")
    score.add_argument("bench_dir", metavar="BENCH_DIR", help="a folder written by clipaudit export")
    score.add_argument("--model", dest="models", action="append", required=True, metavar="SPEC",
                       help="a model spec with an image and a text tower (see README, Models); repeatable")
    score.add_argument("--json", dest="json_out", metavar="OUT", help="also write the scores as JSON to OUT")
    score.add_argument("--clip-benchmark-dir", metavar="DIR",
                       help="also write one CLIP_benchmark result JSON per (model, task) into DIR, for "
                            "`clip_benchmark build DIR --output benchmark.csv`")
    score.add_argument("--severities", type=_levels, default=(), metavar="LEVELS",
                       help="also measure pair accuracy with both images degraded by each graded corruption (JPEG, "
                            "downscale, blur, noise, brightness) at these levels, e.g. 1,3,5 (1 mild .. 5 severe)")
    score.add_argument("--runner", choices=("ray", "local"), default="ray",
                       help="ray: actor pools as the embed stage (default); local: in-process, no Ray")
    score.add_argument("--batch-size", type=int, default=32, help="images per model forward")
    score.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _levels(text: str) -> tuple[int, ...]:
    """``1,3,5`` -> (1, 3, 5); argparse reports anything else as a bad value."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected levels such as 1,3,5, got {text!r}") from exc


def run_score(args: argparse.Namespace) -> int:
    """Run ``clipaudit score``: print the table, optionally write the JSON."""
    from clipaudit.benchmark.score import format_scores, score_benchmark, scores_json
    from clipaudit.config import EmbedConfig
    from clipaudit.io import fs

    scores = score_benchmark(args.bench_dir, args.models, runner=args.runner,
                             embed=EmbedConfig(batch_size=args.batch_size), severities=args.severities)
    sys.stdout.write(format_scores(scores))
    if args.json_out:
        fs.write_json(args.json_out, scores_json(args.bench_dir, scores))
    if args.clip_benchmark_dir:
        from clipaudit.benchmark.clip_benchmark import write_results

        paths = write_results(args.clip_benchmark_dir, args.bench_dir,
                              {spec: score.figures for spec, score in scores.items()})
        print(f"{len(paths)} CLIP_benchmark result files in {args.clip_benchmark_dir}")
    return 0
