"""Shared fixtures: the real local stack (MLflow + S3 on loopback) and the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr.config import REPO_ROOT, SAMPLE_DATA
from cxr.data.storage import StorageConfig
from infra.local.stack import LocalStack

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as jobs/cli.py does
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
    TorchTrainer and Ray Data tasks in one session never wait on each other. The dashboard is on
    for the state API that Ray Train's placement-group cleaner needs (see jobs/runtime.py)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)
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


@pytest.fixture(scope="session")
def tiny_models(local_stack, tmp_path_factory) -> dict[str, str]:
    """An untrained tiny segmenter and classifier, really registered on the loopback MLflow, with
    the cards training would write: for tests of what uses models (masking, scoring), not of skill.
    Returns {"segmenter": models:/NAME/V, "classifier": models:/NAME/V}."""
    import torch

    from cxr import tracking
    from cxr.config import load_platform
    from cxr.models import build_model
    from cxr.preprocess import preprocessing_spec
    from cxr.train.checkpoints import save_checkpoint

    platform = load_platform()
    torch.manual_seed(0)
    # One run per model, as training does: a run holds one model under its "model" artifacts.
    run_id = tracking.start_run(platform.tracking_uri, "cxr-test-fixtures", "tiny-segmenter")
    out = {}
    seg_dir = tmp_path_factory.mktemp("tiny-seg")
    save_checkpoint(build_model("unet-tiny"), seg_dir, {"model": "unet-tiny"})
    seg_card = {"task": "segmenter", "architecture": "unet-tiny", "labels": ["lung"], "input": {"shape": [1, 64, 64]},
                "preprocessing": preprocessing_spec("segmenter", 64), "mask_dilation_px": 3}
    version = tracking.register_model(platform.tracking_uri, platform.registered_models["segmenter"], run_id, seg_dir,
                                      seg_card, (1, 64, 64), (1, 64, 64), "lung_logits")
    out["segmenter"] = f"models:/{platform.registered_models['segmenter']}/{version}"
    tracking.end_run(platform.tracking_uri, run_id)
    run_id = tracking.start_run(platform.tracking_uri, "cxr-test-fixtures", "tiny-classifier")
    labels = ["covid", "normal", "bacterial", "viral"]
    cls_dir = tmp_path_factory.mktemp("tiny-cls")
    kwargs = {"num_classes": 4, "dropout": 0.5}
    save_checkpoint(build_model("resnet18-tiny", **kwargs), cls_dir, {"model": "resnet18-tiny", "model_kwargs": kwargs})
    cls_card = {"task": "classifier", "architecture": "resnet18-tiny", "labels": labels, "model_kwargs": kwargs,
                "input": {"shape": [3, 64, 64]},
                "preprocessing": preprocessing_spec("classifier", 64, lung_mask=True, dilation_px=3,
                                                    segmenter_name=platform.registered_models["segmenter"],
                                                    segmenter_version=str(version)),
                # An operating point as cxr finetune keeps one, for the scorer's screen_positive.
                "metrics": {"test": {"screening": {"threshold": 0.25, "min_specificity": 0.85,
                                                   "chosen_on": "validation, all images (n=6)"}}}}
    cls_version = tracking.register_model(platform.tracking_uri, platform.registered_models["classifier"], run_id,
                                          cls_dir, cls_card, (3, 64, 64), (4,), "logits")
    out["classifier"] = f"models:/{platform.registered_models['classifier']}/{cls_version}"
    tracking.end_run(platform.tracking_uri, run_id)
    return out
