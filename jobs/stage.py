"""Entry point for ``ray job submit``: one stage over one config (the same as ``clipaudit STAGE``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/stage.py embed --config configs/imagenet.yaml [--set key=value ...]

Stages: ingest, embed, neighbours, daf, tcac, summarize, validate, report. Each reads the tables the earlier
stages left in ``run_dir``, so a long audit can be submitted stage by stage (and a failed stage re-submitted
alone). Under ``ray job submit`` the driver joins the job's cluster (``RAY_ADDRESS`` is set by Ray).
"""

import logging
import sys

from clipaudit.cli import main
from clipaudit.pipeline import STAGES

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("clipaudit.jobs").error("usage: python jobs/stage.py STAGE --config CONFIG [--set k=v] "
                                                  "(STAGE: %s)", ", ".join(STAGES))
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
