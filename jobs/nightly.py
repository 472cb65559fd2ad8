"""Entry point for a nightly ``ray job submit`` (or a KubeRay RayJob / RayCronJob): audit, then diff.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/nightly.py --config configs/imagenet.yaml [--set key=value ...] [--fail-on-new]

Runs every stage over the config's ``run_dir`` (finished work is skipped, so a nightly run over the same
directory only does what changed), then compares this run with the previous finished run of the directory
(``clipaudit diff RUN_DIR@previous RUN_DIR``: the table tags each run leaves) and writes the differences to
``run_dir/diffs/<run_id>.json``. ``--fail-on-new`` makes the job fail (exit status 3) when failure types
appeared that the previous run did not have, so the scheduler's alerting sees it.
"""

import argparse
import logging
import sys

from clipaudit.cli import main
from clipaudit.config import load_config
from clipaudit.io import fs
from clipaudit.runs import finished_runs, previous_run_id

log = logging.getLogger("clipaudit.jobs")


def nightly(argv: list[str]) -> int:
    """Audit then diff against the previous run; returns the exit status."""
    parser = argparse.ArgumentParser(prog="jobs/nightly.py", add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--fail-on-new", action="store_true")
    known, _ = parser.parse_known_args(argv)
    forwarded = [arg for arg in argv if arg != "--fail-on-new"]
    status = main(["run", *forwarded])
    if status:
        return status
    run_dir = load_config(known.config, known.overrides).run_dir
    previous = previous_run_id(run_dir)
    if previous is None:
        log.info("nightly: first finished run of %s, nothing to compare with", run_dir)
        return 0
    current = finished_runs(run_dir)[-1]
    out = fs.join(run_dir, "diffs", f"{current}.json")
    log.info("nightly: run %s against %s -> %s", current, previous, out)
    return main(["diff", f"{run_dir}@{previous}", f"{run_dir}@{current}", "--json", out,
                 *(["--fail-on-new"] if known.fail_on_new else [])])


if __name__ == "__main__":
    sys.exit(nightly(sys.argv[1:]))
