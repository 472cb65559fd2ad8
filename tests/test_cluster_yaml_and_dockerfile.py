"""cluster.yaml and the Dockerfile agree with the code: cluster.yaml describes a CPU head that takes no work with
spot workers, the Dockerfile uses the pinned Ray and copies the project's folders. And they pass the checks of the
tools that read them: cluster.yaml Ray's autoscaler schema (after the defaults `ray up` merges in) and EC2's API model
(RunInstances requests, the resources Ray's AWS provider detects for the instance types), the Dockerfile the repo's
paths and the pinned Ray. The KubeRay manifests: test_cluster_files.py."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from cluster_files_helpers import PYPROJECT, RAY_PIN, REPO


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


# ---------------------------------------------------------------------------------------------------------------------
# cluster.yaml checked against the schemas of the tools that read it: the Ray autoscaler's own (ray-schema.json, after
# the defaults `ray up` merges in) and EC2's API model; the Dockerfile against the repo.


def _ray_checked(config: dict) -> dict:
    """What `ray up` does to the config before it touches the cloud: merge the provider's defaults
    (prepare_config), then validate against Ray's schema and its cross-field rules (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema() -> None:
    raw = _cluster()
    prepared = _ray_checked(raw)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    (worker,) = [n for name, n in nodes.items() if name != prepared["head_node_type"]]
    assert worker["min_workers"] == 0 < worker["max_workers"] <= prepared["max_workers"]
    # the autoscaler plans with the declared resources: a GPU worker must say it has a GPU (and CPUs to feed it)
    assert worker["resources"].get("GPU", 0) >= 1 and worker["resources"].get("CPU", 0) >= 1
    # nothing comes from Ray's AWS defaults.yaml (a conda PATH tweak, `pip install` of a nightly Ray wheel)
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, key
        assert prepared[key] == raw[key], key
    # token auth as the comments say: off on every node alike, so the dashboard/job API stays on the head's loopback
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=disabled ray start ") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[0]
    assert prepared["docker"]["image"].startswith("YOUR-REGISTRY/")  # the same placeholder as deploy/kuberay


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(idle_timeout_minute=5),                                  # misspelled top-level key
    lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "1"}),   # wrong type
    lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),        # required field gone
    lambda c: c["docker"].update(pull_before_run="yes"),                         # wrong type in a nested object
    lambda c: c.update(head_node_type="cpu_head"),                               # names no node type
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9),     # sum(min_workers) > max_workers
])
def test_rays_schema_check_catches_mistakes(mutate) -> None:
    config = _cluster()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_checked(config)


def test_cluster_yaml_resources_agree_with_what_ray_detects_on_ec2(monkeypatch) -> None:
    """Ray's AWS provider fills a node type's resources from EC2's DescribeInstanceTypes (at `ray up`; declared values
    win). Run that code against moto's EC2 (its instance-type catalogue, no network; asked for this config's instance
    types only, as listing the whole catalogue takes seconds) and compare: the declared CPU and GPU of each node type
    are what the instance has (the head's CPU 0 deliberately less)."""
    pytest.importorskip("moto")
    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws import node_provider

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    prepared = _ray_checked(_cluster())
    types = sorted({n["node_config"]["InstanceType"] for n in prepared["available_node_types"].values()})

    def list_ec2_instances(region: str, aws_credentials: dict | None = None) -> list[dict]:
        ec2 = boto3.client("ec2", region_name=region)
        return ec2.describe_instance_types(InstanceTypes=types)["InstanceTypes"]

    monkeypatch.setattr(node_provider, "list_ec2_instances", list_ec2_instances)
    blank = copy.deepcopy(prepared)
    for node in blank["available_node_types"].values():
        node["resources"] = {}
    with mock_aws():
        detected = node_provider.AWSNodeProvider.fillout_available_node_types_resources(blank)
        filled = node_provider.AWSNodeProvider.fillout_available_node_types_resources(prepared)
    for name, node in prepared["available_node_types"].items():
        found = detected["available_node_types"][name]["resources"]
        for key, value in node["resources"].items():
            if name == prepared["head_node_type"] and key == "CPU":
                assert value == 0 < found["CPU"]
            else:
                assert value == found[key], (name, key, value, found)
        kept = filled["available_node_types"][name]["resources"]
        assert {k: v for k, v in kept.items() if k in node["resources"]} == node["resources"]
    assert detected["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


def test_cluster_yaml_node_configs_are_valid_ec2_run_instances_requests() -> None:
    """Ray passes node_config to EC2 RunInstances (ImageId latest_dlami -> Ray's pinned DLAMI for the region):
    check it against botocore's EC2 API model (keys, types, instance types), offline."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    model = botocore_session.get_session().get_service_model("ec2")
    run_instances = model.operation_model("RunInstances").input_shape
    instance_types = set(model.shape_for("InstanceType").enum)
    cluster = _ray_checked(_cluster())
    for name, node in cluster["available_node_types"].items():
        request = {**node["node_config"], "MinCount": 1, "MaxCount": 1}
        if request.get("ImageId", "").lower() in ("", "latest_dlami"):
            request["ImageId"] = DEFAULT_AMI[cluster["provider"]["region"]]
        report = ParamValidator().validate(request, run_instances)
        assert not report.has_errors(), (name, report.generate_report())
        assert request["InstanceType"] in instance_types, name
    bad = {**cluster["available_node_types"]["gpu_worker"]["node_config"], "MinCount": 1, "MaxCount": 1,
           "InstanceMarketOption": {"MarketType": "spot"}}
    assert ParamValidator().validate(bad, run_instances).has_errors()


# --- Dockerfile ----------------------------------------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_paths_and_versions_match_the_repo() -> None:
    instructions = _dockerfile()
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    version, py_major, py_minor = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)(?:-\S+)?", base).groups()
    assert version == RAY_PIN, (base, RAY_PIN)
    requires = re.fullmatch(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()
    assert (int(py_major), int(py_minor)) >= tuple(map(int, requires))
    (workdir,) = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdir == "/opt/clipaudit"   # where _repo_path (the KubeRay entrypoints) expects the project
    copied = set()
    for op, arg in instructions:
        if op in ("COPY", "ADD"):
            *sources, dest = [word for word in arg.split() if not word.startswith("--")]
            assert dest.startswith("./") or dest.startswith(workdir), arg
            for source in sources:
                assert (REPO / source).exists(), f"COPY source missing in the repo: {source}"
                copied.add(Path(source))
    readme = PYPROJECT["project"].get("readme")
    assert {Path("pyproject.toml"), Path("src")} <= copied and (not readme or Path(readme) in copied)
    (cmd,) = [arg for op, arg in instructions if op == "CMD"]
    argv = json.loads(cmd)   # exec form: no shell between Docker and python
    assert argv[0] == "python" and argv[2] == "--config"
    for rel in (argv[1], argv[3]):
        assert (REPO / rel).is_file(), rel
        assert any(Path(rel).is_relative_to(c) for c in copied), f"{rel} is not copied into the image"
    # what the build's smoke test imports is what pyproject installs (or the project itself)
    for op, arg in instructions:
        if op == "RUN" and "python -c" in arg:
            for imports in re.findall(r'python -c "import ([\w, ]+)"', arg):
                for module in (m.strip() for m in imports.split(",")):
                    assert importlib.util.find_spec(module) is not None, module
