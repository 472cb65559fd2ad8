"""The ``clipaudit`` command: ``clipaudit run``, one stage (``clipaudit ingest`` ...), all over one config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from clipaudit.benchmark.commands import add_export_parser, add_score_parser, run_export, run_score
from clipaudit.config import load_config
from clipaudit.errors import ClipauditError
from clipaudit.model_check import add_models_parser, run_models
from clipaudit.pipeline import STAGES, parse_stages, run_pipeline
from clipaudit.probe.package import add_train_probe_parser, run_train_probe


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for nested keys (models.clip=tiny-clip); repeatable")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--new-run", action="store_true",
                        help="start a new run in run_dir: the earlier run's tables, stats and records move to "
                             "run_dir/previous/<timestamp>/ (local run_dir only); needed when a model's weights "
                             "changed since the earlier run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so ``--help`` imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="clipaudit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stages in order (all by default)")
    _add_config_args(run)
    run.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    for stage in STAGES:
        _add_config_args(commands.add_parser(stage, help=f"run the {stage} stage only"))
    _add_llm_args(commands.choices)
    for add_parser, _ in COMMANDS.values():
        add_parser(commands)
    return parser


def _add_diff_parser(commands: argparse._SubParsersAction) -> None:
    """``clipaudit diff RUN_A RUN_B [--json OUT]``."""
    diff = commands.add_parser("diff", help="what changed between two runs (failure types, corpus, per-transform)",
                               description="Compare two runs. A run is a run directory, RUN_DIR@RUN_ID (a finished "
                                           "run of it, read back through the table tags it left) or "
                                           "RUN_DIR@previous (the finished run before the latest).")
    diff.add_argument("run_a", metavar="RUN_A", help="the earlier run")
    diff.add_argument("run_b", metavar="RUN_B", help="the later run")
    diff.add_argument("--json", dest="json_out", metavar="OUT", help="also write the differences as JSON to OUT")
    diff.add_argument("--fail-on-new", action="store_true",
                      help="exit with status 3 when RUN_B has failure types RUN_A does not, for any CLIP model "
                           "(for nightly alerts)")
    diff.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _diff(args: argparse.Namespace) -> int:
    """Run ``clipaudit diff``: print the differences, optionally write them as JSON."""
    from clipaudit.io import fs
    from clipaudit.report.diff import diff_runs, format_diff, new_failure_types
    from clipaudit.run_view import RunView

    result = diff_runs(RunView.parse(args.run_a), RunView.parse(args.run_b))
    sys.stdout.write(format_diff(result))
    if args.json_out:
        fs.write_json(args.json_out, result)
    return 3 if args.fail_on_new and new_failure_types(result) else 0


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "diff": (_add_diff_parser, _diff),
    "export": (add_export_parser, run_export),
    "score": (add_score_parser, run_score),
    "train-probe": (add_train_probe_parser, run_train_probe),
    "models": (add_models_parser, run_models),
}
"""The commands that take no config: name -> (adds its parser, runs it and returns the exit status)."""


def _add_llm_args(commands: dict[str, argparse.ArgumentParser]) -> None:
    """``--dry-run`` on run / summarize / validate; Batch API files on summarize."""
    for name in ("run", "summarize", "validate"):
        if name in commands:
            commands[name].add_argument("--dry-run", action="store_true",
                                        help="write the LLM prompts and the cost estimate to run_dir/llm/ and send "
                                             "nothing (same as --set llm.dry_run=true)")
    if "summarize" in commands:
        batch = commands["summarize"].add_mutually_exclusive_group()
        batch.add_argument("--export-batch", metavar="FILE",
                           help="write the requests not answered yet as an OpenAI Batch API input JSONL file and "
                                "send nothing")
        batch.add_argument("--import-batch", metavar="FILE",
                           help="read the answers from an OpenAI Batch API output JSONL file instead of sending")


def _llm_overrides(args: argparse.Namespace) -> list[str]:
    """The LLM command-line flags as config overrides (paths JSON-quoted, relative to the current directory)."""
    overrides = ["llm.dry_run=true"] if getattr(args, "dry_run", False) else []
    for flag in ("export_batch", "import_batch"):
        value = getattr(args, flag, None)
        if value:
            overrides.append(f"llm.{flag}={json.dumps(value)}")
    return overrides


def configure_logging(verbose: bool) -> None:
    """clipaudit's own messages from INFO up; other libraries' (open_clip logs on the root logger, matplotlib...)
    only from WARNING up, unless ``verbose``: then everything from DEBUG up."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("clipaudit").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipaudit`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command][1](args)
        args.overrides += _llm_overrides(args)
        config = load_config(args.config, args.overrides)
        stages = parse_stages(args.stages) if args.command == "run" else [args.command]
        run_pipeline(config, stages, new_run=args.new_run)
    except ClipauditError as exc:
        print(f"clipaudit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
