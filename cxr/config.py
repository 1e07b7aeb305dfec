"""Configuration: one frozen dataclass per job, YAML defaults, CLI overrides; and the platform
settings in ``mlflow.yaml`` (tracking URI, storage endpoint, model names).

Precedence, lowest first: dataclass defaults < ``cxr/configs/<job>.yaml`` < ``--config FILE``
< command-line flags. The resolved config is what gets saved and logged.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from cxr.data.storage import StorageConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SAMPLE_DATA = REPO_ROOT / "data" / "sample"

T = TypeVar("T")


def default_data_root() -> str:
    """``$CXR_DATA``, else ``../shared/data`` beside the repo, else the shipped sample."""
    if os.environ.get("CXR_DATA"):
        return os.environ["CXR_DATA"]
    shared = (REPO_ROOT / ".." / "shared" / "data").resolve()
    return str(shared if shared.is_dir() else SAMPLE_DATA)


def option(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrepareDataConfig:
    """``cxr prepare-data``: Parquet manifests with patient-grouped splits."""

    NAME: ClassVar[str] = "prepare_data"
    data_root: str = option("", "curated data root (kermany/, covid/, lungseg/); default $CXR_DATA, "
                                "else ../shared/data, else the shipped sample")
    out: str = option("out/manifests", "output folder or s3:// prefix for the manifests")
    csv: str | None = option(None, "build one manifest from a CSV with path,label,patient_id[,source] instead")
    images: str | None = option(None, "build one unlabeled manifest from a folder or s3:// prefix instead")
    seed: int = option(1234, "seed of the split; the same seed gives the same split")
    val_fraction: float = option(0.1, "share of patients in val (multiple of 0.05)")
    test_fraction: float = option(0.2, "share of patients in test (multiple of 0.05)")
    source_val_fraction: float = option(0.1, "share of kermany/train patients held out as val for pretraining")
    source_exclude_shared_patients: bool = option(
        True, "leave out of pretraining the kermany/train images whose patient id is also in kermany/test")
    threads: int = option(16, "threads reading files to hash them")

    def resolved_data_root(self) -> Path:
        return Path(self.data_root or default_data_root()).expanduser().resolve()


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """``cxr train-segmenter``: a lung UNet trained with Ray Train, logged and registered in MLflow."""

    NAME: ClassVar[str] = "train_segmenter"
    manifest: str = option("out/manifests/lungseg.parquet", "lungseg manifest (uri, mask_uri, source, split)")
    model: str = option("unet-resnet34", "architecture name (cxr.models registry)")
    image_size: int = option(256, "letterbox size in px")
    epochs: int = option(60, "training epochs")
    batch_size: int = option(16, "batch size per worker")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to 0)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    num_workers: int = option(2, "Ray Train workers")
    use_gpu: bool = option(False, "one GPU per worker, bf16 autocast")
    loader_workers: int = option(2, "DataLoader processes per worker")
    max_train_images: int | None = option(None, "use at most this many training images (quick runs)")
    seed: int = option(0, "random seed")
    dilation_px: int = option(3, "dilation of the lung mask when it is applied, recorded in the card")
    register: bool = option(True, "register the best model as cxr-segmenter")
    run_name: str | None = option(None, "MLflow run name")
    storage_path: str = option("out/ray", "Ray Train results and checkpoints (local folder or s3://)")


# --- loading -------------------------------------------------------------------------------

def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, typing.get_args(annotation)[0], name)
                     for v in items if v != "")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: expected {annotation.__name__}, got {value!r}") from e
    return value


def load_config(cls: type[T], config_file: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Resolve a job config. Unknown keys fail and list the valid ones."""
    values: dict[str, Any] = {}
    default_file = CONFIG_DIR / f"{cls.NAME}.yaml"
    for path in (default_file if default_file.exists() else None, config_file):
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a YAML mapping of option: value")
            values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in config_fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.NAME}; valid: {sorted(valid)}")
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in config_fields(type(cfg))}


# --- platform (mlflow.yaml) ------------------------------------------------------------------

@dataclass(frozen=True)
class PlatformConfig:
    """Tracking, registry and storage settings shared by all jobs (``mlflow.yaml``)."""

    tracking_uri: str
    artifact_location: str | None
    storage: StorageConfig
    experiments: dict[str, str]
    registered_models: dict[str, str]
    aliases: dict[str, str]


def load_platform(path: str | None = None) -> PlatformConfig:
    """Read ``mlflow.yaml`` (``$CXR_PLATFORM_CONFIG`` or the repo's). Environment wins:
    ``MLFLOW_TRACKING_URI`` and ``CXR_S3_ENDPOINT`` point the same config at other services.
    """
    path = path or os.environ.get("CXR_PLATFORM_CONFIG") or str(REPO_ROOT / "mlflow.yaml")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    storage_raw = dict(raw.get("storage") or {})
    if "CXR_S3_ENDPOINT" in os.environ:
        storage_raw["s3_endpoint"] = os.environ["CXR_S3_ENDPOINT"] or None
    return PlatformConfig(
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or raw["tracking_uri"],
        artifact_location=raw.get("artifact_location"),
        storage=StorageConfig(**storage_raw),
        experiments=dict(raw.get("experiments") or {}),
        registered_models=dict(raw.get("registered_models") or {}),
        aliases=dict(raw.get("aliases") or {}),
    )
