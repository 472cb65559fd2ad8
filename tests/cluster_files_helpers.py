"""What the cluster-file tests (test_cluster_files.py, test_cluster_yaml_and_dockerfile.py) share: the repo root,
its pyproject.toml, and the Ray version pinned there."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_PIN = next(m.group(1) for dep in PYPROJECT["project"]["dependencies"]
               if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))))
