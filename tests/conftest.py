"""Shared fixtures: the real local stack (MLflow + S3 on loopback) and the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr.config import REPO_ROOT, SAMPLE_DATA
from cxr.data.storage import StorageConfig
from infra.local.stack import LocalStack

SHARED_DATA = Path(os.environ.get("CXR_DATA") or REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def full_data_root() -> Path:
    """The curated data; tests that need all of it skip, saying why, where it is absent."""
    if not (SHARED_DATA / "kermany" / "labels.csv").exists():
        pytest.skip(f"curated data not found at {SHARED_DATA} (set CXR_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow server and a real S3 server on free loopback ports, for the whole session."""
    stack = LocalStack(tmp_path_factory.mktemp("stack")).start()
    saved = {k: os.environ.get(k) for k in stack.env}
    os.environ.update(stack.env)  # jobs read the endpoints from the environment, as in production
    yield stack
    stack.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def storage(local_stack: LocalStack) -> StorageConfig:
    return StorageConfig(s3_endpoint=local_stack.s3_endpoint, max_attempts=3)


@pytest.fixture(scope="session")
def sample_bucket(local_stack: LocalStack, sample_root: Path) -> str:
    """The shipped sample, uploaded to s3://cxr-sample/data/ on the loopback server."""
    local_stack.upload_folder(sample_root, "cxr-sample", "data")
    return "s3://cxr-sample/data"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray. num_cpus=4 over-subscribes the 2 cores logically, so a 2-worker
    TorchTrainer and Ray Data tasks in one session never wait on each other."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_manifests(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifests of the shipped sample (real images), built once per session."""
    from cxr.config import PrepareDataConfig
    from jobs import prepare_data

    out = tmp_path_factory.mktemp("manifests")
    assert prepare_data.main(PrepareDataConfig(data_root=str(sample_root), out=str(out))) == 0
    return out
