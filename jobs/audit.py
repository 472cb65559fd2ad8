"""Entry point for ``ray job submit``: the whole audit (or ``--stages``) over one config.

    ray job submit --working-dir . -- python jobs/audit.py --config configs/imagenet.yaml

Under ``ray job submit`` the driver joins the job's cluster (``RAY_ADDRESS`` is set by Ray).
"""

import sys

from clipaudit.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
