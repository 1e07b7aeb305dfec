"""Every infra manifest parses, validates against the Kubernetes and KubeRay schemas, names images the
Dockerfiles build and objects that exist; every entrypoint and config it names exists and loads."""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from cxr.config import REPO_ROOT, load_config
from jobs.cli import COMMANDS

INFRA = REPO_ROOT / "infra"
MANIFESTS = sorted(INFRA.glob("k8s/*.yaml")) + sorted(INFRA.glob("ray/*.yaml"))


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses(path):
    docs = _documents(path)
    assert docs
    for doc in docs:
        assert "kind" in doc or "cluster_name" in doc, f"{path.name}: neither a Kubernetes object nor a Ray cluster"


def _check_cxr_command(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "cxr" and argv[1] in COMMANDS, f"unknown entrypoint {command!r}"
    cls = COMMANDS[argv[1]][0]
    if "--config" in argv:
        config = REPO_ROOT / argv[argv.index("--config") + 1]
        assert config.exists(), f"{command!r}: {config} does not exist"
        cfg = load_config(cls, str(config))                       # unknown keys would fail here
        for name in ("pretrain_config", "finetune_config", "segmenter_config"):
            nested = getattr(cfg, name, None)
            if nested:
                assert (REPO_ROOT / nested).exists(), f"{config.name}: {name} {nested} does not exist"


def test_rayjob_entrypoints_and_configs_exist():
    jobs = [d for p in MANIFESTS for d in _documents(p) if d.get("kind") == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"cxr-score-nightly", "cxr-retrain-weekly"}
    for job in jobs:
        _check_cxr_command(job["spec"]["entrypoint"])
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert all(g["minReplicas"] == 0 for g in groups)


def test_cronjobs_create_the_rayjobs_that_exist():
    crons = [d for d in _documents(INFRA / "k8s" / "cronjobs.yaml") if d["kind"] == "CronJob"]
    assert len(crons) == 2
    for cron in crons:
        (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        script = container["args"][0]
        referenced = script.split("/rayjobs/")[1].split()[0]
        assert (INFRA / "k8s" / referenced).exists()
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_cluster_launcher_gpu_group_scales_from_zero():
    (cluster,) = _documents(INFRA / "ray" / "cluster.yaml")
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0


def test_no_secrets_in_manifests():
    for path in MANIFESTS:
        text = path.read_text().lower()
        for needle in ("aws_secret_access_key:", "password:", "postgresql://"):
            assert needle not in text.replace("postgresql://user:pass@host", ""), f"{path.name} holds {needle}"


def test_mlflow_server_has_a_database_and_s3_artifacts():
    docs = _documents(INFRA / "k8s" / "mlflow.yaml")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args and "--artifacts-destination=s3://" in args
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == "cxr-mlflow-db"


# --- A deployment that runs: schemas, images, references, scheduling ------------------------------
# Offline: the Kubernetes schemas ship with kubernetes-validate, the KubeRay CRDs are vendored.

K8S = INFRA / "k8s"
K8S_VERSION = "1.31.0"                    # the Kubernetes the manifests target (docs/DEPLOY.md)
KUBERAY_VERSION = "v1.7.0"                # the KubeRay operator the RayJobs need (docs/DEPLOY.md)
CRDS = K8S / "crds" / f"kuberay-{KUBERAY_VERSION}"
DEPLOY_MD = REPO_ROOT / "docs" / "DEPLOY.md"
K8S_MANIFESTS = sorted(K8S.glob("*.yaml"))
KUSTOMIZE = "kustomize.config.k8s.io/"
IMAGE_REPO = "ghcr.io/cxr/cxr"
# Images that no Dockerfile here builds, each pinned, and why it is allowed.
EXTERNAL_IMAGES = {
    # The Ray cluster launcher (infra/ray/cluster.yaml) runs Ray's own images, Python 3.11, and
    # installs the project at node start; tag = the pinned ray version.
    "rayproject/ray:2.60.0-py311",
    "rayproject/ray:2.60.0-py311-gpu",
}

try:
    _Loader = yaml.CSafeLoader
except AttributeError:                    # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S_MANIFESTS for d in _documents(p)]


def _project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _pinned(name: str) -> str:
    (dep,) = [d for d in _project()["dependencies"] if re.match(rf"{name}(\[.*\])?==", d)]
    return dep.split("==")[1].split()[0]


def _walk(node, key=None):
    """Yield (key, value) for every mapping entry under node, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


# --- Kubernetes schemas ---------------------------------------------------------------------------

def test_kubernetes_objects_validate_against_the_kubernetes_schema():
    import kubernetes_validate

    checked = 0
    for path, doc in _k8s_objects():
        if doc["apiVersion"].startswith(("ray.io/", KUSTOMIZE)):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)   # strict: no unknown fields
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e}")
        checked += 1
    assert checked >= 10


def _strict(schema):
    """The CRD schema as the API server's strict field validation sees it: unknown fields fail."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def _crd_schemas() -> dict:
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=_Loader):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version["served"]:
                    schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _validate_ray_object(doc: dict) -> None:
    import jsonschema

    schema = _crd_schemas().get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"KubeRay {KUBERAY_VERSION} serves no {doc['apiVersion']} {doc['kind']}"
    jsonschema.Draft7Validator(schema).validate(doc)


def test_kuberay_crds_are_vendored():
    assert {k for _, k in _crd_schemas()} >= {"RayJob", "RayCluster", "RayCronJob"}


def test_ray_objects_validate_against_the_kuberay_crds():
    import jsonschema

    ray_docs = [(p, d) for p, d in _k8s_objects() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_docs} == {"RayJob"}
    for path, doc in ray_docs:
        try:
            _validate_ray_object(doc)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{path.name}: {e.message} at {list(e.absolute_path)}")
        assert f"KubeRay {KUBERAY_VERSION}" in path.read_text(), f"{path.name} does not name its KubeRay version"


def test_crd_validation_catches_a_misspelt_field():
    import jsonschema

    (job,) = [d for _, d in _k8s_objects() if d.get("kind") == "RayJob" and "score" in d["metadata"]["name"]]
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["enableInTreeAutoScaling"] = True
    with pytest.raises(jsonschema.ValidationError):
        _validate_ray_object(bad)


def test_gpu_worker_groups_can_scale_up():
    for _, doc in _k8s_objects():
        if doc.get("kind") != "RayJob":
            continue
        spec = doc["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == _pinned("ray")
        for group in cluster["workerGroupSpecs"]:
            assert group["maxReplicas"] > 0
            if group.get("replicas", 0) == 0:
                assert cluster.get("enableInTreeAutoscaling") is True, \
                    f"{doc['metadata']['name']}: {group['groupName']} starts at 0 with no autoscaler"


# --- Images ---------------------------------------------------------------------------------------

def _dockerfile_images() -> tuple[set[str], set[str]]:
    """(the tags the Dockerfiles build, the images they start FROM)."""
    version = _project()["version"]
    built, bases = set(), set()
    for name, suffix in (("Dockerfile", ""), ("Dockerfile.cuda", "-cuda")):
        text = (REPO_ROOT / name).read_text()
        (arg,) = re.findall(r"^ARG CXR_VERSION=(\S+)$", text, re.M)
        assert arg == version, f"{name}: CXR_VERSION {arg} is not the project version {version}"
        built.add(f"{IMAGE_REPO}:{version}{suffix}")
        assert f"-t {IMAGE_REPO}:{version}{suffix} " in text, f"{name} does not say how to build its tag"
        for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
            bases.add(image)
            if stage == "kubectl":
                built.add(f"{IMAGE_REPO}:{version}-kubectl")
    return built, bases


def _manifest_images() -> list[tuple[str, str]]:
    images = []
    for path in MANIFESTS:
        for doc in _documents(path):
            images += [(path.name, v) for k, v in _walk(doc) if k in ("image", "head_image", "worker_image")]
    return images


def test_dockerfile_base_images_are_pinned():
    _, bases = _dockerfile_images()
    assert bases
    for image in bases:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"unpinned base image {image}"
    assert any(b.startswith("python:3.11") for b in bases)
    assert any(b.startswith("nvidia/cuda:") for b in bases)


def test_every_image_is_built_here_or_a_pinned_external_one():
    built, _ = _dockerfile_images()
    images = _manifest_images()
    assert len(images) >= 8
    for where, image in images:
        assert image in built or image in EXTERNAL_IMAGES, f"{where}: {image} is neither built by the Dockerfiles ({sorted(built)}) nor allow-listed"
        assert not image.endswith(":latest") and ":" in image
    used = {image for _, image in images}
    assert built <= used, f"built but never used: {built - used}"
    ray = _pinned("ray")
    assert all(ray in image for image in EXTERNAL_IMAGES if image.startswith("rayproject/ray:"))


def test_gpu_pods_run_the_cuda_image():
    for _, doc in _k8s_objects():
        for key, value in _walk(doc):
            if key == "containers":
                for c in value:
                    wants_gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                    assert c["image"].endswith("-cuda") == wants_gpu, f"{c['name']}: {c['image']}"


def test_kubectl_matches_the_kubernetes_version():
    text = (REPO_ROOT / "Dockerfile").read_text()
    (tag,) = re.findall(r"^FROM registry\.k8s\.io/kubectl:v(\d+\.\d+)\.\d+", text, re.M)
    assert tag == ".".join(K8S_VERSION.split(".")[:2])


# --- References -----------------------------------------------------------------------------------

REF_KINDS = ("ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim")


def _references() -> set[tuple[str, str]]:
    refs = set()
    for path in MANIFESTS:
        for doc in _documents(path):
            for key, value in _walk(doc):
                if key == "serviceAccountName":
                    refs.add(("ServiceAccount", value))
                elif key in ("configMapRef", "configMapKeyRef", "configMap"):
                    refs.add(("ConfigMap", value["name"]))
                elif key in ("secretRef", "secretKeyRef"):
                    refs.add(("Secret", value["name"]))
                elif key == "secret" and isinstance(value, dict):
                    refs.add(("Secret", value["secretName"]))
                elif key == "persistentVolumeClaim":
                    refs.add(("PersistentVolumeClaim", value["claimName"]))
    return refs


def _defined() -> set[tuple[str, str]]:
    defined = set()
    for _, doc in _k8s_objects():
        if doc["kind"] in REF_KINDS:
            defined.add((doc["kind"], doc["metadata"]["name"]))
        if doc["apiVersion"].startswith(KUSTOMIZE):
            defined |= {("ConfigMap", g["name"]) for g in doc.get("configMapGenerator", [])}
            defined |= {("Secret", g["name"]) for g in doc.get("secretGenerator", [])}
    return defined


def _operator_created() -> set[tuple[str, str]]:
    """Rows `| Kind | `name` | ...` of docs/DEPLOY.md's table of what the operator creates."""
    text = DEPLOY_MD.read_text()
    section = text.split("## Created by the operator", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(rf"^\|\s*({'|'.join(REF_KINDS)})\s*\|\s*`([^`]+)`", section, re.M))


def test_every_referenced_object_is_defined_or_documented():
    refs, defined, documented = _references(), _defined(), _operator_created()
    assert ("ServiceAccount", "cxr") in refs and ("Secret", "cxr-mlflow-db") in refs
    missing = refs - defined - documented
    assert not missing, f"referenced, but neither defined under infra/k8s nor listed in docs/DEPLOY.md: {sorted(missing)}"
    assert not (defined & documented), f"both defined and documented as operator-created: {defined & documented}"
    assert documented <= refs, f"documented but never referenced: {documented - refs}"


def test_no_secret_values_in_the_repo():
    for path, doc in _k8s_objects():
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path.name}: Secret with values"
        if doc["apiVersion"].startswith(KUSTOMIZE):
            assert not doc.get("secretGenerator"), "Secrets are created by the operator (docs/DEPLOY.md)"


def test_kustomization_names_files_that_exist():
    (kust,) = [d for _, d in _k8s_objects() if d["apiVersion"].startswith(KUSTOMIZE)]
    files = kust["resources"] + [f for g in kust.get("configMapGenerator", []) for f in g["files"]]
    for name in files:
        assert (K8S / name).exists(), name
    assert not any(name.startswith("rayjob-") for name in kust["resources"]), "RayJobs are created by the CronJobs"
    others = {p.name for p in K8S_MANIFESTS} - {"kustomization.yaml"} - set(files)
    assert not others, f"manifests that `kubectl apply -k` would not apply: {others}"


def _rules_for(service_account: str) -> list[dict]:
    objs = [d for _, d in _k8s_objects()]
    roles = {d["metadata"]["name"]: d for d in objs if d["kind"] == "Role"}
    rules = []
    for binding in (d for d in objs if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, binding["metadata"]["name"]
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["name"]) in _defined()
            if subject["name"] == service_account:
                rules += roles[binding["roleRef"]["name"]]["rules"]
    return rules


def test_scheduler_may_manage_rayjobs():
    granted = {v for r in _rules_for("cxr-scheduler") if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]
               for v in r["verbs"]}
    assert granted >= {"create", "get", "list", "delete"}


def test_ray_head_may_autoscale():
    rules = _rules_for("cxr")
    assert any("rayclusters" in r["resources"] and "patch" in r["verbs"] for r in rules)
    assert any("pods" in r["resources"] and {"list", "patch"} <= set(r["verbs"]) for r in rules)


# --- MLflow ---------------------------------------------------------------------------------------

def test_mlflow_allows_the_service_host_names():
    from mlflow.server.security_utils import is_allowed_host_header

    (deploy,) = [d for _, d in _k8s_objects() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    (arg,) = [a for a in container["args"] if a.startswith("--allowed-hosts=")]
    hosts = [h.strip() for h in arg.split("=", 1)[1].split(",")]
    (platform,) = [d for _, d in _k8s_objects() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cxr-platform"]
    uri_host = platform["data"]["MLFLOW_TRACKING_URI"].split("://", 1)[1].split("/")[0]
    for host in (uri_host, "mlflow", "mlflow:5000", "mlflow.cxr.svc:5000", "mlflow.cxr.svc.cluster.local:5000",
                 "localhost:5000"):
        assert is_allowed_host_header(hosts, host), f"MLflow would answer 403 to Host: {host}"
    assert "*" not in hosts and not is_allowed_host_header(hosts, "attacker.example:5000")


# --- Scheduling -----------------------------------------------------------------------------------

def _run_submitter(cron: dict, tmp_path: Path, rayjobs: str, fail_get: bool = False):
    """Run a CronJob's submitter script with a fake kubectl that lists `rayjobs` ("name status" lines)."""
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    bin_dir, mount = tmp_path / "bin", tmp_path / "rayjobs"
    bin_dir.mkdir(exist_ok=True)
    mount.mkdir(exist_ok=True)
    for p in K8S.glob("rayjob-*.yaml"):
        (mount / p.name).write_text(p.read_text())
    calls = tmp_path / "calls"
    calls.write_text("")
    fake = bin_dir / "kubectl"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" | head -c 200 | tr "\\n" " " >> {calls}; echo >> {calls}\n'
        'case "$1" in\n'
        '  get) [ -n "$FAIL_GET" ] && exit 1; printf "$FAKE_RAYJOBS";;\n'
        f'  create) cat > {tmp_path}/created;;\n'
        "esac\n")
    fake.chmod(0o755)
    script = container["args"][0].replace("/rayjobs/", f"{mount}/")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_RAYJOBS=rayjobs, FAIL_GET="1" if fail_get else "")
    result = subprocess.run([*container["command"], script], env=env,
                            capture_output=True, text=True, timeout=60)
    created = tmp_path / "created"
    return result, calls.read_text().splitlines(), (created.read_text() if created.exists() else None)


@pytest.mark.skipif(sys.platform == "win32" or not Path("/bin/sh").exists(), reason="needs a POSIX shell")
@pytest.mark.parametrize("name", ["cxr-score-nightly", "cxr-retrain-weekly"])
def test_cronjob_never_overlaps_a_running_rayjob(name, tmp_path):
    (cron,) = [d for d in _documents(K8S / "cronjobs.yaml") if d["kind"] == "CronJob" and d["metadata"]["name"] == name]
    (job,) = [d for _, d in _k8s_objects() if d.get("kind") == "RayJob" and d["metadata"]["name"] == name]
    label = f"cxr/job={job['metadata']['labels']['cxr/job']}"

    result, calls, created = _run_submitter(cron, tmp_path, "")          # nothing running: creates
    assert result.returncode == 0, result.stderr
    assert created and yaml.safe_load(created)["metadata"]["name"] != name
    assert any(label in c for c in calls if c.startswith("get rayjobs")), calls

    for status in ("", "Initializing", "Running", "Waiting", "Retrying", "Suspended"):
        (tmp_path / "created").unlink(missing_ok=True)
        result, _, created = _run_submitter(cron, tmp_path, f"old-1 Complete\\nold-2 {status}\\n")
        assert result.returncode != 0 and created is None, f"created a RayJob while one is {status or 'New'}"
        assert "old-2" in result.stderr

    (tmp_path / "created").unlink(missing_ok=True)
    result, _, created = _run_submitter(cron, tmp_path, "", fail_get=True)  # cannot list: fails closed
    assert result.returncode != 0 and created is None

    (tmp_path / "created").unlink(missing_ok=True)
    old = "".join(f"old-{i} {'Complete' if i % 2 else 'Failed'}\\n" for i in range(10))
    result, calls, created = _run_submitter(cron, tmp_path, old)       # finished ones: keeps the newest 7
    assert result.returncode == 0 and created
    (delete,) = [c for c in calls if c.startswith("delete")]
    assert delete.split() == ["delete", "rayjob", "old-0", "old-1", "old-2"]


def test_scheduling_design_is_documented():
    text = DEPLOY_MD.read_text()
    assert KUBERAY_VERSION in text and f"kuberay-{KUBERAY_VERSION}" in text
    assert "cxr/lease.py" in text and "jobDeploymentStatus" in text and "RayCronJob" in text


# --- The Ray cluster launcher ---------------------------------------------------------------------

def test_cluster_launcher_config_is_valid_and_python_311():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    (cluster,) = _documents(INFRA / "ray" / "cluster.yaml")
    jsonschema.validate(cluster, schema)
    docker = cluster["docker"]
    for key in ("head_image", "worker_image"):
        assert "-py311" in docker[key], f"{key} {docker[key]} is not Python 3.11"
    assert docker["worker_image"].endswith("-gpu")
