"""Every infra manifest parses, and every entrypoint and config it names exists and loads."""

import shlex
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
