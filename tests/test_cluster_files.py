"""The KubeRay cluster files agree with the code: the entry points they name exist and run, the manifests parse and
describe a CPU head that takes no work with autoscaling GPU workers, and the nightly RayCronJob runs the same RayJob as
rayjob.yaml. And they pass the checks of the tools that read them: every manifest in deploy/kuberay/ the KubeRay CRD
schemas vendored in deploy/kuberay/crds/ (Kubernetes API fields for the other kinds). Every jobs/ and configs/ path
named in any cluster file (cluster.yaml, the Dockerfile, the manifests) exists. cluster.yaml and the Dockerfile
themselves: test_cluster_yaml_and_dockerfile.py."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from cluster_files_helpers import RAY_PIN, REPO

from clipaudit.pipeline import STAGES

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


def test_stage_entry_point_names_the_stages() -> None:
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "stage.py"), "nope"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert ", ".join(STAGES) in result.stderr
    assert (REPO / "jobs" / "nightly.py").is_file() and (REPO / "jobs" / "audit.py").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The shipped KubeRay manifests checked against the schemas of the tools that read them: deploy/kuberay/*.yaml against
# the KubeRay CRD schemas vendored in deploy/kuberay/crds/ (KubeRay version in crds/SOURCE.json).

CRDS = KUBERAY / "crds"
SOURCE = json.loads((CRDS / "SOURCE.json").read_text())


# --- KubeRay manifests ---------------------------------------------------------------------------------------------

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_FORMATS = jsonschema.FormatChecker(formats=())
for _name, (_lo, _hi) in _INT_RANGES.items():
    _FORMATS.checks(_name)(lambda v, lo=_lo, hi=_hi: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi)


def _k8s_list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items are unique; `map` items are unique by x-kubernetes-list-map-keys (a key
    left out counts as its schema default, as the API server fills it: ports are keyed by containerPort + protocol)."""
    if not validator.is_type(instance, "array") or list_type == "atomic":
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        item_props = schema.get("items", {}).get("properties", {})
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [json.dumps([item.get(k, item_props.get(k, {}).get("default")) for k in names])
                for item in instance if isinstance(item, dict)]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {list_type}: {dupes}")


_K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _k8s_list_type})
_SUB_SCHEMA_KEYS = ("items", "additionalProperties", "not")
_SUB_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def _structural(node: dict, path: tuple = (), cel: list | None = None) -> dict:
    """A Kubernetes structural schema as plain JSON Schema, with the API server's rules written out:
    - an object with `properties` takes no other field (unless x-kubernetes-preserve-unknown-fields): the API server
      drops unknown fields, and kubectl (server-side field validation, Strict by default) refuses them;
    - x-kubernetes-int-or-string: an integer or a string (the string patterns still apply to strings);
    - nullable: null allowed; format int32/int64: the range; x-kubernetes-list-type: see _k8s_list_type;
    - x-kubernetes-validations (CEL) cannot be evaluated here: their paths go to `cel`, and the manifests must not set
      those fields (test_kuberay_manifests_avoid_fields_with_cel_rules)."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _structural(v, (*path, k), cel) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in _SUB_SCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = _structural(out[key], (*path, "*") if key != "not" else path, cel)
    for key in _SUB_SCHEMA_LISTS:
        if key in out:
            out[key] = [_structural(v, path, cel) for v in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "x-kubernetes-validations" in out and cel is not None:
        cel.append(path)
    return out


_META_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"   # DNS-1123 subdomain
_LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"   # optional DNS prefix/
              r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}


def _obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


def _object_meta(name_pattern: str = _META_NAME, max_length: int = 253) -> dict:
    """ObjectMeta as a manifest may write it (the fields a client sets)."""
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return _obj({"name": {"type": "string", "maxLength": max_length, "pattern": name_pattern},
                 "generateName": {"type": "string"}, "namespace": {"type": "string", "pattern": r"^[a-z0-9-]{1,63}$"},
                 "labels": {**strings, "propertyNames": {"pattern": _LABEL_KEY}, "additionalProperties": _LABEL_VALUE},
                 "annotations": strings, "finalizers": {"type": "array", "items": {"type": "string"}}}, ("name",))


@functools.cache
def _crd_schemas() -> tuple[dict[str, dict], dict[str, list]]:
    schemas, cel = {}, {}
    dns1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"   # KubeRay's own name check (ValidateRay*Metadata)
    for kind, entry in SOURCE["crds"].items():
        paths: list = []
        schema = _structural(json.loads((CRDS / entry["file"]).read_text()), (), paths)
        schema["properties"]["metadata"] = _object_meta(dns1035, SOURCE["max_name_length"][kind])
        schema["properties"]["apiVersion"] = {"const": f"{entry['group']}/{entry['version']}"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
        schemas[kind], cel[kind] = schema, paths
    # Other kinds (nightly-cronjob.yaml): Kubernetes API fields as in its API reference, the parts a client writes;
    # the pod template is the real schema (core/v1 PodTemplateSpec, as embedded in the RayCluster CRD).
    pod_template = schemas["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    integer, string, boolean = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
    strings = {"type": "array", "items": string}
    job_spec = _obj({**{k: integer for k in ("parallelism", "completions", "activeDeadlineSeconds", "backoffLimit",
                                             "backoffLimitPerIndex", "maxFailedIndexes", "ttlSecondsAfterFinished")},
                     "completionMode": {"enum": ["NonIndexed", "Indexed"]}, "suspend": boolean,
                     "manualSelector": boolean, "selector": {"type": "object"}, "podFailurePolicy": {"type": "object"},
                     "successPolicy": {"type": "object"}, "managedBy": string,
                     "podReplacementPolicy": {"enum": ["TerminatingOrFailed", "Failed"]},
                     "template": pod_template}, ("template",))
    cron_spec = _obj({"schedule": string, "timeZone": string, "startingDeadlineSeconds": integer, "suspend": boolean,
                      "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
                      "successfulJobsHistoryLimit": integer, "failedJobsHistoryLimit": integer,
                      "jobTemplate": _obj({"metadata": _object_meta(), "spec": job_spec}, ("spec",))},
                     ("schedule", "jobTemplate"))
    verbs = {"enum": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "*",
                      "use", "bind", "escalate", "impersonate", "approve", "sign"]}
    rule = _obj({"apiGroups": strings, "resources": strings, "resourceNames": strings, "nonResourceURLs": strings,
                 "verbs": {"type": "array", "items": verbs, "minItems": 1}}, ("verbs",))
    subject = _obj({"kind": {"enum": ["ServiceAccount", "User", "Group"]}, "name": string, "namespace": string,
                    "apiGroup": string}, ("kind", "name"))
    role_ref = _obj({"apiGroup": {"const": "rbac.authorization.k8s.io"}, "kind": {"enum": ["Role", "ClusterRole"]},
                     "name": string}, ("apiGroup", "kind", "name"))
    name_ref = {"type": "array", "items": _obj({"name": string})}
    others = {
        "ServiceAccount": ("v1", {"automountServiceAccountToken": boolean, "imagePullSecrets": name_ref,
                                  "secrets": {"type": "array", "items": {"type": "object"}}}, ()),
        "Role": ("rbac.authorization.k8s.io/v1", {"rules": {"type": "array", "items": rule}}, ()),
        "RoleBinding": ("rbac.authorization.k8s.io/v1", {"subjects": {"type": "array", "items": subject},
                                                         "roleRef": role_ref}, ("roleRef",)),
        "CronJob": ("batch/v1", {"spec": cron_spec}, ("spec",)),
    }
    for kind, (api_version, fields, required) in others.items():
        schema = _obj({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _object_meta(),
                       **fields}, ("apiVersion", "kind", "metadata", *required))
        schemas[kind] = _structural(schema)
    return schemas, cel


def _manifest_errors(doc: dict) -> list[str]:
    """Every way `doc` breaks the schema of its kind, as 'path: message' lines."""
    schemas, _ = _crd_schemas()
    kind = doc.get("kind")
    if kind not in schemas:
        return [f"kind {kind!r} has no schema here"]
    validator = _K8sValidator(schemas[kind], format_checker=_FORMATS)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    for cron_field in ("schedule",):   # standard 5-field cron, no TZ= prefix (KubeRay and Kubernetes refuse both)
        schedule = (doc.get("spec") or {}).get(cron_field)
        if isinstance(schedule, str) and (len(schedule.split()) != 5 or "TZ" in schedule
                                          or not re.fullmatch(r"[\d*/,\- A-Za-z?]+", schedule)):
            errors.append(f"spec.{cron_field}: not a standard 5-field cron schedule: {schedule!r}")
    return errors


MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml"))


def test_kuberay_schemas_are_vendored() -> None:
    assert SOURCE["ref"] and re.fullmatch(r"[0-9a-f]{40}", SOURCE["commit"])
    assert set(SOURCE["crds"]) == {"RayCluster", "RayJob", "RayCronJob"}
    assert SOURCE["commit"] in (CRDS / "README.md").read_text()
    schemas, _ = _crd_schemas()
    spec = schemas["RayJob"]["properties"]["spec"]["properties"]
    assert spec["rayClusterSpec"]["additionalProperties"] is False and "entrypoint" in spec


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_match_their_schemas(name: str) -> None:
    docs = _docs(name)
    assert docs and all(doc for doc in docs)
    for doc in docs:
        assert _manifest_errors(doc) == [], (name, doc.get("kind"))


def _values_at(doc, path: tuple):
    if not path:
        yield doc
    elif isinstance(doc, dict):
        if path[0] == "*":
            for value in doc.values():
                yield from _values_at(value, path[1:])
        elif path[0] in doc:
            yield from _values_at(doc[path[0]], path[1:])
    elif isinstance(doc, list) and path[0] == "*":
        for value in doc:
            yield from _values_at(value, path[1:])


def test_kuberay_manifests_avoid_fields_with_cel_rules() -> None:
    """The CRDs' x-kubernetes-validations (CEL, checked by the API server) are not evaluated here: make sure no
    manifest sets a field they guard (managedBy, deletionStrategy, gcsFaultToleranceOptions.backend in v1.7.0), so
    the schema check above is the whole check. A manifest that starts using one must be checked by hand."""
    _, cel = _crd_schemas()
    assert all(cel[kind] for kind in ("RayJob", "RayCronJob"))
    for name in MANIFESTS:
        for doc in _docs(name):
            for path in cel.get(doc["kind"], []):
                assert list(_values_at(doc, path)) == [], (name, ".".join(path))


def _worker_group(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


_MUTATIONS = {
    "misspelled field": ("rayjob.yaml", lambda d: _worker_group(d).update(maxReplica=8)),
    "misspelled container field": ("rayjob.yaml", lambda d: _worker_group(d)["template"]["spec"]["containers"][0]
                                   .update(imagePullpolicy="Always")),
    "int for a string map (rayStartParams)": ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]
                                              ["rayStartParams"].update({"num-cpus": 0})),
    "string for an integer": ("rayjob.yaml", lambda d: _worker_group(d).update(maxReplicas="8")),
    "value outside an enum": ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"]
                              .update(upscalingMode="Fast")),
    "bad quantity": ("rayjob.yaml", lambda d: _worker_group(d)["template"]["spec"]["containers"][0]["resources"]
                     ["limits"].update(memory="28 GB")),
    "list for an int-or-string": ("rayjob.yaml", lambda d: _worker_group(d)["template"]["spec"]["containers"][0]
                                  ["resources"]["limits"].update(cpu=[7])),
    "int32 out of range": ("rayjob.yaml", lambda d: _worker_group(d).update(maxReplicas=2**31)),
    "duplicate list-map key": ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
                               ["spec"]["containers"][0]["ports"].append({"containerPort": 6379, "name": "again"})),
    "required field missing": ("nightly-raycronjob.yaml", lambda d: d["spec"].pop("schedule")),
    "bad cron schedule": ("nightly-raycronjob.yaml", lambda d: d["spec"].update(schedule="0 2 * *")),
    "name too long for KubeRay": ("nightly-raycronjob.yaml", lambda d: d["metadata"].update(name="x" * 37)),
    "misspelled RayJob template field": ("nightly-raycronjob.yaml", lambda d: d["spec"]["jobTemplate"]
                                         .update(shutdownAfterJobFinish=True)),
    "wrong apiVersion": ("nightly-raycronjob.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1")),
    "CronJob enum": ("nightly-cronjob.yaml", lambda d: d["kind"] == "CronJob"
                     and d["spec"].update(concurrencyPolicy="forbid")),
    "CronJob pod template field": ("nightly-cronjob.yaml", lambda d: d["kind"] == "CronJob"
                                   and d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                                   .update(serviceAccount_Name="x")),
    "Role verb": ("nightly-cronjob.yaml", lambda d: d["kind"] == "Role" and d["rules"][0]["verbs"].append("craete")),
    "RoleBinding roleRef": ("nightly-cronjob.yaml", lambda d: d["kind"] == "RoleBinding"
                            and d["roleRef"].pop("kind")),
    "bad label value": ("nightly-cronjob.yaml", lambda d: d["kind"] == "CronJob"
                        and d["metadata"]["labels"].update({"app.kubernetes.io/name": "clip audit"})),
}


@pytest.mark.parametrize("mistake", sorted(_MUTATIONS))
def test_kuberay_validation_catches_mistakes(mistake: str) -> None:
    name, mutate = _MUTATIONS[mistake]
    errors = []
    for doc in _docs(name):
        assert _manifest_errors(doc) == []
        bad = copy.deepcopy(doc)
        mutate(bad)
        if bad != doc:
            errors += _manifest_errors(bad)
    assert errors, mistake


def _nightly_script(pod: dict) -> str:
    return pod["containers"][0]["args"][0]


def test_nightly_cronjob_script_agrees_with_kuberay_and_its_role() -> None:
    kinds = {doc["kind"]: doc for doc in _docs("nightly-cronjob.yaml")}
    pod = kinds["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = _nightly_script(pod)
    # the states it treats as "last night's audit is over": real JobDeploymentStatus values, the terminal ones among
    finished = set(re.search(r"^\s*(\w+(?:\|\w+)*)\)\s*;;", script, re.M).group(1).split("|")) - {"Absent"}
    assert finished <= set(SOURCE["job_deployment_statuses"]), finished
    assert set(SOURCE["terminal_job_deployment_statuses"]) <= finished
    # the manifest it creates is the ConfigMap key the set-up comment makes from deploy/kuberay/rayjob.yaml
    manifest = re.search(r"manifest=(\S+)", script).group(1)
    (mount,) = pod["containers"][0]["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    header = (KUBERAY / "nightly-cronjob.yaml").read_text()
    key, source = re.search(rf"configmap {volume['configMap']['name']} --from-file=(\S+)=(\S+)", header).groups()
    assert manifest == f"{mount['mountPath']}/{key}" and (REPO / source) == KUBERAY / "rayjob.yaml"
    # the Role lets it run what it runs: get -f, delete --wait (get, then list + watch until gone), create -f
    (rule,) = kinds["Role"]["rules"]
    rayjob = SOURCE["crds"]["RayJob"]
    assert rule["apiGroups"] == [rayjob["group"]] and rule["resources"] == [rayjob["plural"]]
    assert "kubectl delete" in script and "--wait=true" in script
    assert {"get", "create", "delete", "list", "watch"} <= set(rule["verbs"])
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"]}]


def test_rayjob_names_fit_kuberay_limits() -> None:
    (rayjob,) = _docs("rayjob.yaml")
    (cron,) = _docs("nightly-raycronjob.yaml")
    assert len(rayjob["metadata"]["name"]) <= SOURCE["max_name_length"]["RayJob"]
    assert len(cron["metadata"]["name"]) <= SOURCE["max_name_length"]["RayCronJob"]
    for doc in (rayjob, {"spec": cron["spec"]["jobTemplate"]}):
        spec = doc["spec"]
        assert spec["rayClusterSpec"]["rayVersion"] == RAY_PIN


def test_paths_named_in_cluster_files_exist() -> None:
    """Every jobs/*.py and configs/*.yaml named anywhere in the cluster files (commands, comments) is in the repo."""
    files = [REPO / "cluster.yaml", REPO / "Dockerfile", *sorted(KUBERAY.glob("*.yaml"))]
    named = set()
    for path in files:
        named |= set(re.findall(r"(?<![\w.-])((?:jobs|configs)/[\w./-]+\.(?:py|yaml))", path.read_text()))
    assert {"jobs/audit.py", "jobs/nightly.py", "configs/imagenet.yaml", "configs/demo.yaml"} <= named
    assert not [n for n in named if not (REPO / n).is_file()]
