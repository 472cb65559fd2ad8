"""Re-vendor the KubeRay CRD schemas that tests/test_cluster_files.py validates deploy/kuberay/*.yaml against.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python deploy/kuberay/crds/vendor.py /tmp/kuberay v1.7.0

For each CRD (RayCluster, RayJob, RayCronJob) it writes <kind>.json: the `openAPIV3Schema` of the served version
v1, exactly as in ray-operator/config/crd/bases/ray.io_<plural>.yaml at that tag, minus the `description` texts
(documentation only; they are most of the size). SOURCE.json names the tag and commit, each CRD's group and plural,
and two facts from the operator's Go source that the manifests rely on and no schema states: the RayJob
JobDeploymentStatus values (apis/ray/v1/rayjob_types.go) and the name length limits (controllers/ray/utils/constant.go).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}


def strip_descriptions(node: object, in_properties: bool = False) -> object:
    """Drop the schema keyword `description` everywhere (not a field that happens to be called description)."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v, in_properties=not in_properties and k == "properties")
                for k, v in node.items() if in_properties or k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(checkout: str, ref: str) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", checkout, *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", f"{ref}^{{commit}}").strip()
    files = {}
    for kind, plural in PLURALS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(git("show", f"{commit}:{path}"))
        assert crd["spec"]["names"]["kind"] == kind, path
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        (HERE / f"{kind}.json").write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        files[kind] = {"file": f"{kind}.json", "from": path, "group": crd["spec"]["group"], "version": "v1",
                       "plural": crd["spec"]["names"]["plural"]}
    types_go = git("show", f"{commit}:ray-operator/apis/ray/v1/rayjob_types.go")
    statuses = re.findall(r'^\s*JobDeploymentStatus\w*\s+JobDeploymentStatus\s*=\s*"(\w*)"', types_go, re.M)
    terminal = re.search(r"func IsJobDeploymentTerminal\(.*?\n}", types_go, re.S).group(0)
    constants = git("show", f"{commit}:ray-operator/controllers/ray/utils/constant.go")
    limits = {}
    for name, expr in re.findall(r"^\s*Max(Ray\w+)NameLength\s*=\s*(.+)$", constants, re.M):
        base, _, minus = expr.partition("-")
        base = base.strip()
        value = int(base) if base.isdigit() else limits[re.fullmatch(r"Max(Ray\w+)NameLength", base).group(1)]
        limits[name] = value - int(minus or 0)
    source = {"repository": "https://github.com/ray-project/kuberay", "ref": ref, "commit": commit, "crds": files,
              "note": "openAPIV3Schema of version v1, description texts removed; regenerate with vendor.py",
              "job_deployment_statuses": statuses,
              "terminal_job_deployment_statuses": [s for s in statuses if f"JobDeploymentStatus{s}" in terminal and s],
              "max_name_length": limits}
    (HERE / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
