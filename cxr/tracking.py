"""Everything MLflow: runs, metrics, artifacts, registration with model cards, aliases, loading.

The only module that imports mlflow. Every function takes the tracking URI explicitly: the
library never sets a global one. Registered models are safetensors weights plus a JSON card
that names the architecture, so loading one never unpickles code.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from cxr.train.checkpoints import META, WEIGHTS, load_checkpoint

log = logging.getLogger(__name__)

INTENDED_USE = "research use, not for diagnosis"
CARD = "card.json"
SAFE_FILES = {WEIGHTS, META, CARD, "MLmodel", "registered_model_meta"}


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name, artifact_location=artifact_location)


def start_run(tracking_uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None,
              artifact_location: str | None = None, parent_run_id: str | None = None) -> str:
    tags = {"mlflow.source.git.commit": git_commit(), **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment, artifact_location),
                                          run_name=run_name, tags=tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, ok: bool = True) -> None:
    client(tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(flat), 100):  # MLflow's batch limit is 100 params
        client(tracking_uri).log_batch(run_id, params=flat[i:i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    client(tracking_uri).log_batch(run_id, metrics=batch)


def log_dict(tracking_uri: str, run_id: str, obj: Any, artifact_file: str) -> None:
    client(tracking_uri).log_dict(run_id, obj, artifact_file)


def log_figure(tracking_uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    client(tracking_uri).log_figure(run_id, figure, artifact_file)


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(tracking_uri).log_artifact(run_id, str(path), artifact_path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _signature(input_shape: tuple[int, ...], output_shape: tuple[int, ...], output_name: str) -> ModelSignature:
    f32 = np.dtype(np.float32)
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, *input_shape), "image")]),
                          outputs=Schema([TensorSpec(f32, (-1, *output_shape), output_name)]))


def register_model(tracking_uri: str, name: str, run_id: str, checkpoint_dir: Path, card: dict,
                   input_shape: tuple[int, ...], output_shape: tuple[int, ...], output_name: str) -> str:
    """Log the checkpoint as an MLflow model (custom ``cxr`` flavor, with signature) and register it.

    Returns the new version number. The card becomes the version's description, tags and
    ``card.json``. A run holds one model: a second registration from the same run would
    overwrite the first one's files, so it is refused.
    """
    if client(tracking_uri).list_artifacts(run_id, "model"):
        raise ValueError(f"run {run_id} already holds a model; register each model from its own run")
    card = {**card, "intended_use": INTENDED_USE, "run_id": run_id, "git_commit": git_commit()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        for f in (WEIGHTS, META):
            shutil.copy2(Path(checkpoint_dir) / f, model_dir / f)
        (model_dir / CARD).write_text(json.dumps(card, indent=2, default=str))
        mlmodel = Model(artifact_path="model", run_id=run_id,
                        signature=_signature(input_shape, output_shape, output_name))
        mlmodel.add_flavor("cxr", architecture=card["architecture"], weights=WEIGHTS, card=CARD,
                           format="safetensors")
        mlmodel.save(str(model_dir / "MLmodel"))
        client(tracking_uri).log_artifacts(run_id, str(model_dir), "model")
    c = client(tracking_uri)
    try:
        c.create_registered_model(name, description=f"cxr {card.get('task', '')} model. {INTENDED_USE}.")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    tags = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))[:5000]
            for k, v in card.items()}
    version = c.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags,
                                     description=json.dumps(card, indent=2, default=str)[:5000])
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    client(tracking_uri).set_registered_model_alias(name, alias, version)


def resolve_version(tracking_uri: str, model_uri: str):
    """The registry entry of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    ref = model_uri[len("models:/"):]
    c = client(tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return c.get_model_version_by_alias(name, alias)
    name, version = ref.rsplit("/", 1)
    return c.get_model_version(name, version)


def load_registered(tracking_uri: str, model_uri: str, map_location: str = "cpu") -> tuple[nn.Module, dict, Any]:
    """Load a registered model: (module in eval mode, card, registry version).

    Refuses any artifact that is not in the safe set (weights as safetensors, JSON, MLmodel),
    so a planted pickle never reaches ``torch.load``.
    """
    version = resolve_version(tracking_uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(download_artifacts(artifact_uri=version.source, dst_path=tmp, tracking_uri=tracking_uri))
        unexpected = sorted(p.name for p in local.iterdir() if p.name not in SAFE_FILES)
        if unexpected:
            raise ValueError(f"{model_uri} (version {version.version}) holds unexpected files {unexpected}: "
                             "refusing to load; registered models are safetensors + JSON only")
        model, _ = load_checkpoint(local, map_location)
        card = json.loads((local / CARD).read_text())
    return model, card, version


def log_checkpoint(tracking_uri: str, run_id: str, checkpoint_dir: Path, artifact_path: str = "checkpoint") -> None:
    """Attach a safetensors checkpoint (weights + meta.json) to a run, e.g. a pretraining run's best."""
    for f in (WEIGHTS, META):
        client(tracking_uri).log_artifact(run_id, str(Path(checkpoint_dir) / f), artifact_path)


def load_run_checkpoint(tracking_uri: str, run_id: str, artifact_path: str = "checkpoint",
                        map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """The checkpoint a run logged with ``log_checkpoint``; like ``load_registered``, it refuses
    anything but safetensors + JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                        tracking_uri=tracking_uri))
        unexpected = sorted(p.name for p in local.iterdir() if p.name not in SAFE_FILES)
        if unexpected:
            raise ValueError(f"run {run_id} {artifact_path}/ holds unexpected files {unexpected}: refusing to load")
        return load_checkpoint(local, map_location)


def log_figures(tracking_uri: str, run_id: str, figures: dict, folder: str) -> None:
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        client(tracking_uri).log_figure(run_id, figure, f"{folder}/{name}")
        plt.close(figure)


def load_card(tracking_uri: str, model_uri: str) -> dict:
    """The model card of a registered version, without its weights."""
    version = resolve_version(tracking_uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(artifact_uri=f"{version.source}/{CARD}", dst_path=tmp, tracking_uri=tracking_uri)
        return json.loads(Path(local).read_text())


def metric_history(tracking_uri: str, run_id: str | None, keys: list[str]):
    """A run's per-step metrics as a frame (column ``epoch`` = step); empty if none."""
    import pandas as pd

    if not run_id:
        return pd.DataFrame()
    c = client(tracking_uri)
    series = {k: {m.step: m.value for m in c.get_metric_history(run_id, k)} for k in keys}
    if not any(series.values()):
        return pd.DataFrame()
    frame = pd.DataFrame(series).sort_index()
    return frame.rename_axis("epoch").reset_index()
