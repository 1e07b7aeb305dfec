"""Everything MLflow: runs, metrics, datasets, artifacts, registration with model cards,
aliases, loading.

The only module that imports mlflow. Every function takes the tracking URI explicitly: the
library never sets a global one. Registered models are safetensors weights plus a JSON card
(``cxr.card``) and MLflow's python_function flavor through ``cxr.pyfunc``, so loading one
never unpickles code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from cxr.card import INTENDED_USE, ModelCard

from cxr.package import (CARD, Component, check_safe, read_model, read_qc, read_reference, read_screen_info,
                         write_checksums, write_model)

if TYPE_CHECKING:        # torch loads where models do, not in a planning driver
    from torch import nn

log = logging.getLogger(__name__)


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


@contextmanager
def tracked_run(tracking_uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None,
                artifact_location: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """An MLflow run around a block: yields its id; FINISHED if the block returns, FAILED if it raises."""
    run_id = start_run(tracking_uri, experiment, run_name, tags, artifact_location, parent_run_id)
    ok = False
    try:
        yield run_id
        ok = True
    finally:
        end_run(tracking_uri, run_id, ok)


def resume_key(job: str, config: dict, data_digest: str) -> str:
    """What makes two training runs the same run: the job, every setting, the data's digest."""
    text = json.dumps({"job": job, "config": config, "data": data_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def resumable_run(tracking_uri: str, experiment: str, run_name: str | None, key: str, tags: dict | None = None,
                  artifact_location: str | None = None) -> Iterator[tuple[str, bool]]:
    """As ``tracked_run``, but the same command run again after a kill continues its unfinished
    run (tag ``cxr.resume_key`` = ``key``, not FINISHED): yields (run id, resumed). The run's
    Ray Train results are named after its id, so Ray hands the loop its latest checkpoint."""
    c = client(tracking_uri)
    exp = experiment_id(tracking_uri, experiment, artifact_location)
    earlier = [r for r in c.search_runs([exp], f"tags.`cxr.resume_key` = '{key}'", order_by=["attributes.start_time DESC"],
                                        max_results=20) if r.info.status != "FINISHED"]
    if earlier:
        run_id, resumed = earlier[0].info.run_id, True
        c.update_run(run_id, status="RUNNING")
        c.set_tag(run_id, "cxr.resumed", str(int(earlier[0].data.tags.get("cxr.resumed", "0")) + 1))
        log.info("resuming MLflow run %s (%s, left %s)", run_id, run_name, earlier[0].info.status)
    else:
        run_id, resumed = start_run(tracking_uri, experiment, run_name, {**(tags or {}), "cxr.resume_key": key},
                                    artifact_location), False
    monitor = system_metrics(tracking_uri, run_id, resumed)
    ok = False
    try:
        yield run_id, resumed
        ok = True
    finally:
        if monitor is not None:
            monitor.finish()
        end_run(tracking_uri, run_id, ok)


def system_metrics(tracking_uri: str, run_id: str, resumed: bool):
    """MLflow's system metrics (CPU, memory, disk, network; GPU where its packages are) for a
    training run, every 30 s; None where they cannot be collected (never stops a run)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)    # its start and stop lines are noise
        monitor = SystemMetricsMonitor(run_id, sampling_interval=30, resume_logging=resumed, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - optional telemetry
        log.info("no system metrics for run %s: %s", run_id, str(e).splitlines()[0] if str(e) else e)
        return None


def has_params(tracking_uri: str, run_id: str) -> bool:
    return bool(client(tracking_uri).get_run(run_id).data.params)


def logged_steps(tracking_uri: str, run_id: str | None, key: str) -> set[int]:
    """The steps of ``key`` a run has logged (a resumed loop logs each epoch once)."""
    return {m.step for m in client(tracking_uri).get_metric_history(run_id, key)} if run_id else set()


def readable(value: Any) -> str:
    """A parameter as people write it: lists comma-separated, None as "none"."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(readable(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={readable(v)}" for k, v in value.items())
    return str(value)


def log_dataset(tracking_uri: str, run_id: str, frame: Any, source: str, name: str, digest: str,
                context: str = "training") -> None:
    """Log a manifest as the run's input dataset (the run page's "Datasets"), with its digest."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    # MLflow keeps a dataset digest of at most 36 characters; the full sha256 is in the card.
    # Its warnings here (a local path "can be interpreted in multiple ways", integer columns
    # "cannot represent missing values") are about inferring a serving schema, not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:32])
    client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, readable(v)[:6000]) for k, v in sorted(params.items())]
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


def code_state() -> dict:
    """The code a model was trained with: the commit, whether the tree had changes not in it,
    and the installed cxr's version."""
    try:
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = bool(changes)
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    return {"commit": git_commit(), "dirty": dirty, "cxr": cxr_version()}


def _tensor_signature(card: ModelCard) -> ModelSignature:
    f32 = np.dtype(np.float32)
    c, h, w = card.input_shape
    outputs = (TensorSpec(f32, (-1, len(card.labels)), "logits") if card.task == "classifier"
               else TensorSpec(f32, (-1, 1, h, w), "lung_logits"))
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, c, h, w), "image")]), outputs=Schema([outputs]))


def _save_pyfunc(folder: Path, signature: ModelSignature, input_example: Any, flavor: dict) -> None:
    """MLflow's files for ``folder``'s model (python_function through ``cxr.pyfunc``, and the
    ``cxr`` flavor naming the format), written beside the data files already there."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        mlmodel = Model()
        mlmodel.add_flavor("cxr", **flavor)
        # The environment is this cxr: the loader module is its code, nothing else is shipped.
        mlflow.pyfunc.save_model(str(staged), loader_module="cxr.pyfunc", mlflow_model=mlmodel, signature=signature,
                                 input_example=input_example, pip_requirements=pinned_requirements())
        for p in staged.iterdir():
            shutil.copy2(p, Path(folder) / p.name)


def pinned_requirements() -> list[str]:
    """A served model's environment: this cxr and the torch it ran with (torch is installed
    first and alone, so cxr's own requirements do not pin it)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = [f"cxr=={cxr_version()}"]
    for name in ("torch", "torchvision"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return pins


def cxr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr")
    except PackageNotFoundError:
        return "0+unknown"


def _create_registered_model(c: MlflowClient, name: str, description: str) -> None:
    try:
        c.create_registered_model(name, description=description)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise


def _version_tags(card: ModelCard) -> dict[str, str]:
    """A few searchable tags; the whole card is card.json and the description."""
    p = card.preprocessing
    tags = {"cxr.task": card.task, "cxr.architecture": card.architecture, "cxr.labels": ",".join(card.labels),
            "cxr.input_size": str(p.letterbox_size), "cxr.lung_mask": str(p.lung_mask).lower(),
            "cxr.preprocessing_sha256": p.sha256, "cxr.card_version": str(card.card_version),
            "cxr.intended_use": card.intended_use}
    if p.lung_mask:
        tags["cxr.segmenter"] = f"{p.segmenter_name}/{p.segmenter_version}"
    if card.operating_point:
        tags["cxr.threshold"] = f"{card.operating_point.threshold:.6g}"
    return tags


def _register_folder(c: MlflowClient, name: str, run_id: str, folder: Path, description: str,
                     tags: dict[str, str]) -> str:
    """Log ``folder`` as the run's ``model`` artifacts and register it as a new version of ``name``."""
    if c.list_artifacts(run_id, "model"):
        raise ValueError(f"run {run_id} already holds a model; register each model from its own run")
    c.log_artifacts(run_id, str(folder), "model")
    weights = Path(folder) / ("classifier/model.safetensors" if (Path(folder) / "classifier").is_dir() else "model.safetensors")
    if weights.is_file():        # what a report names as the model: its weights' content, not a version number
        tags = {**tags, "cxr.weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    _create_registered_model(c, name, f"cxr model. {INTENDED_USE}.")
    version = c.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags,
                                     description=description)
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def register_model(tracking_uri: str, name: str, run_id: str, model: nn.Module, card: ModelCard,
                   dtype: str = "float32", qc=None, reference=None) -> str:
    """Register a classifier or segmenter: safetensors weights + the validated card (JSON, and
    Markdown as the version's description), loadable with ``mlflow.pyfunc.load_model`` (tensors
    in, logits out) and by ``load_registered``. Returns the new version number."""
    from cxr.model_card import model_markdown
    card = dataclasses.replace(card, run_id=run_id, git_commit=git_commit()).validate()
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model", model, card, dtype, qc, reference)
        example = np.zeros((1, *card.input_shape), np.float32)
        _save_pyfunc(folder, _tensor_signature(card), example,
                     {"kind": card.task, "architecture": card.architecture, "weights": "model.safetensors",
                      "card": "card.json", "format": "safetensors"})
        return _register_folder(c, name, run_id, folder, model_markdown(card, name), _version_tags(card))


def screen_signature() -> ModelSignature:
    """Inputs: a ``path`` (str: a local path or s3:// URI) or an ``image`` (bytes) column;
    outputs: the fields of a scores row (``cxr.screen.ROW_FIELDS``; null where an input is an
    error row) and the models' names; params: batch_size, heatmap_size."""
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec
    from mlflow.types.schema import Array, Object, Property

    from cxr.qc import SIGNALS as QC_SIGNALS

    def col(kind, name: str, required: bool = False) -> ColSpec:
        return ColSpec(kind, name, required=required)

    outputs = Schema([
        col("string", "uri", True), col("string", "sha256"), col("string", "status", True), col("string", "error"),
        col("string", "skip_reason"),
        col(Array(DataType.string), "labels"), col(Array(DataType.double), "probabilities"),
        col("string", "predicted_label"), col("double", "covid_probability"), col("double", "covid_threshold"),
        col("boolean", "screen_positive"), col("binary", "heatmap_png"), col("long", "heatmap_size"),
        col("string", "heatmap_label"), col("double", "heatmap_scale"), col("binary", "covid_heatmap_png"),
        col("double", "covid_heatmap_scale"), col("binary", "lung_mask_png"),
        col("double", "lung_fraction"), col(Array(DataType.string), "qc_flags", True),
        col("string", "argmax_label"),
        col(Array(Object([Property("flag", DataType.string), Property("score", DataType.double),
                          Property("threshold", DataType.double)])), "qc_scores"),
        col(Object([Property(name, DataType.double, required=False) for name in QC_SIGNALS]), "qc_signals"),
        col("string", "classifier", True), col("string", "segmenter")])
    inputs = Schema([col("string", "path"), col("binary", "image")])
    params = ParamSchema([ParamSpec("batch_size", "long", 32), ParamSpec("heatmap_size", "long", 64)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def save_screen_model(folder: Path, example_image: bytes) -> None:
    """Make a screen folder (``cxr.package.write_screen``) an MLflow model, with its signature
    and an input example, and seal it with checksums."""
    import pandas as pd

    _save_pyfunc(folder, screen_signature(), pd.DataFrame({"image": [example_image]}),
                 {"kind": "screen", "format": "cxr-screen"})
    write_checksums(folder)


def register_screen_folder(tracking_uri: str, name: str, run_id: str, folder: Path) -> str:
    """Register a sealed screen folder (``save_screen_model``) as a new version of ``name``."""
    info = read_screen_info(folder)
    c = client(tracking_uri)
    tags = {"cxr.task": "screen", "cxr.weights_dtype": info["weights_dtype"]}
    for kind in ("classifier", "segmenter"):
        if info.get(kind):
            tags[f"cxr.{kind}"] = f"{info[kind]['name']}/{info[kind]['version']}"
    return _register_folder(c, name, run_id, folder, (Path(folder) / "MODEL_CARD.md").read_text(), tags)


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


def model_exists(tracking_uri: str, model_uri: str) -> bool:
    """Whether ``models:/NAME@ALIAS`` (or ``/VERSION``) resolves; other failures (server down) raise."""
    try:
        resolve_version(tracking_uri, model_uri)
        return True
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise


def download_model(tracking_uri: str, model_uri: str, dst: str | Path):
    """(local folder, registry version) of a registered model's artifacts."""
    version = resolve_version(tracking_uri, model_uri)
    local = Path(download_artifacts(artifact_uri=version.source, dst_path=str(dst), tracking_uri=tracking_uri))
    return local, version


def load_registered(tracking_uri: str, model_uri: str, map_location: str = "cpu") -> Component:
    """A registered classifier or segmenter, in eval mode on ``map_location``, with its
    validated card and its registry name and version.

    Refuses any artifact that is not in the safe set (weights as safetensors, JSON, MLflow's
    metadata), so a planted pickle never reaches ``torch.load``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local, version = download_model(tracking_uri, model_uri, tmp)
        model, card = read_model(local, map_location, f"{model_uri} (version {version.version})")
        qc, reference = read_qc(local), read_reference(local)
    return Component(model, card, version.name, str(version.version), qc, reference)


def log_files(tracking_uri: str, run_id: str, files: list[Path], artifact_path: str) -> None:
    """Attach files to a run under ``artifact_path`` (a checkpoint: ``cxr.train.checkpoints``)."""
    for f in files:
        client(tracking_uri).log_artifact(run_id, str(f), artifact_path)


@contextmanager
def run_files(tracking_uri: str, run_id: str, artifact_path: str) -> Iterator[Path]:
    """A run's ``artifact_path`` folder, downloaded to a temporary folder for the ``with``
    block; like ``load_registered``, it refuses anything but safetensors + JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                        tracking_uri=tracking_uri))
        check_safe(local, f"run {run_id} {artifact_path}/")
        yield local


def log_figures(tracking_uri: str, run_id: str, figures: dict, folder: str) -> None:
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        client(tracking_uri).log_figure(run_id, figure, f"{folder}/{name}")
        plt.close(figure)


def load_card(tracking_uri: str, model_uri: str, check_architecture: bool = True) -> ModelCard:
    """The validated model card of a registered version, without its weights."""
    version = resolve_version(tracking_uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(artifact_uri=f"{version.source}/{CARD}", dst_path=tmp, tracking_uri=tracking_uri)
        return ModelCard.from_json(Path(local).read_text(), check_architecture)


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


def load_reference(tracking_uri: str, model_uri: str):
    """The reference distributions stored beside a registered classifier's weights
    (``cxr.monitoring``), or None for a version registered without them."""
    from cxr.monitoring import REFERENCE_FILE

    version = resolve_version(tracking_uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = download_artifacts(artifact_uri=f"{version.source}/{REFERENCE_FILE}", dst_path=tmp,
                                       tracking_uri=tracking_uri)
        except (MlflowException, OSError):
            return None
        return read_reference(Path(local).parent)


def search_runs(tracking_uri: str, experiment: str, filter_string: str = "", max_results: int = 100,
                order_by: list[str] | None = None) -> list:
    """Runs of an experiment (none if it does not exist), newest first unless ``order_by`` says."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(c.search_runs([exp.experiment_id], filter_string, max_results=max_results,
                              order_by=order_by or ["attributes.start_time DESC"]))


def load_run_dict(tracking_uri: str, run_id: str, artifact_file: str) -> Any:
    """A JSON artifact ``log_dict`` wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp, tracking_uri=tracking_uri)
        return json.loads(Path(local).read_text())
