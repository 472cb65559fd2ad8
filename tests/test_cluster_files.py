"""The cluster files agree with the code: the entry points they name exist and run, the KubeRay manifests parse
and describe a CPU head that takes no work with autoscaling GPU workers, and the nightly RayCronJob runs the same
RayJob as rayjob.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from clipaudit.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def _repo_path(image_path: str) -> Path:
    """/opt/clipaudit/X (where the Dockerfile puts the project) -> REPO/X."""
    assert image_path.startswith("/opt/clipaudit/"), image_path
    return REPO / image_path.removeprefix("/opt/clipaudit/")


def _check_rayjob_spec(spec: dict) -> None:
    python, script, flag, config = spec["entrypoint"].split()
    assert python == "python" and flag == "--config"
    assert _repo_path(script).is_file() and _repo_path(config).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 < workers["maxReplicas"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "spot" in str(workers["template"]["spec"]["nodeSelector"])
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_and_nightly_manifests() -> None:
    (rayjob,) = _docs("rayjob.yaml")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    _check_rayjob_spec(rayjob["spec"])
    (cron,) = _docs("nightly-raycronjob.yaml")
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"]
    template = dict(cron["spec"]["jobTemplate"])
    _check_rayjob_spec(template)
    same = {k: v for k, v in rayjob["spec"].items() if k != "activeDeadlineSeconds"}
    assert {k: v for k, v in template.items() if k != "activeDeadlineSeconds"} == same
    kinds = {doc["kind"]: doc for doc in _docs("nightly-cronjob.yaml")}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    job = kinds["CronJob"]["spec"]
    assert job["concurrencyPolicy"] == "Forbid" and job["schedule"]
    pod = job["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert "kubectl create -f" in pod["containers"][0]["args"][0]
    assert {"create", "delete", "get"} <= set(kinds["Role"]["rules"][0]["verbs"])


def test_cluster_yaml_and_dockerfile() -> None:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    nodes = cluster["available_node_types"]
    assert nodes[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != cluster["head_node_type"]]
    assert workers and all(n["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for n in workers)
    assert cluster["idle_timeout_minutes"] > 0 and cluster["docker"]["image"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in dockerfile
    for folder in ("src", "configs", "jobs"):
        assert f"{folder} ./{folder}" in dockerfile


def test_stage_entry_point_names_the_stages() -> None:
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "stage.py"), "nope"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert ", ".join(STAGES) in result.stderr
    assert (REPO / "jobs" / "nightly.py").is_file() and (REPO / "jobs" / "audit.py").is_file()
