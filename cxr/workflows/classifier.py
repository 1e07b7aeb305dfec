"""Classifier workflows: ``pretrain`` (the source task) and ``finetune`` (train, evaluate,
register with a model card), and what they and ``cxr tune`` share: the task's data through
``Preprocess``, the initial weights, the Ray Train trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr import tracking
from cxr.card import DatasetDigest, ModelCard, OperatingPoint, Preprocessing, portable
from cxr.classification import inference_device
from cxr.config import (ClassifierTrainConfig, FinetuneConfig, PlatformConfig, PretrainConfig, config_to_dict,
                        config_to_plain)
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.evaluation import evaluate_classifier, flat_metrics, screening_threshold
from cxr.models import model_spec
from cxr.models.classifier import read_state_file
from cxr.plots import loss_curves
from cxr.component import Component
from cxr.qc import fit_for_task
from cxr.workflows.monitor import fit_screen_reference
from cxr.model_input import Preprocess
from cxr.train.checkpoints import META, load_checkpoint, load_run_checkpoint, log_checkpoint
from cxr.train.classifier import train_loop_per_worker
from cxr.train.classifier_data import archive_weights, by_split, task_rows
from cxr.train.common import WORKER_RETRIES, ray_storage
from cxr.train.contract import DataContractError, DataCounts, check_manifest, check_unreadable

log = logging.getLogger(__name__)


@dataclass
class Task:
    """A classifier task ready to train on: its rows, model-ready images, and how they were made."""

    rows: pd.DataFrame
    images: np.ndarray
    preprocessing: Preprocessing
    manifest: pd.DataFrame
    digest: str
    preprocess: Preprocess | None = None     # how ``images`` were made: for more images made the same way
    counts: DataCounts | None = None         # what the manifest held and what was dropped


def check_classifier(cfg: ClassifierTrainConfig) -> None:
    """Refuse, before any work, a model that is not a classifier or a weights file that is not there."""
    if model_spec(cfg.model).task != "classifier":
        raise ValueError(f"{cfg.model} is not a classifier")
    if cfg.init_weights and "://" not in cfg.init_weights and not Path(cfg.init_weights).is_file():
        raise ValueError(f"--init-weights {cfg.init_weights}: no such file")


def load_task(cfg: ClassifierTrainConfig, platform: PlatformConfig) -> Task:
    """The task manifest's rows and images through ``Preprocess``: lung-masked by the
    registered segmenter for a finetune config that names one, whose version the
    preprocessing then pins for the model card."""
    manifest = read_manifest(cfg.manifest, platform.storage)
    counts = check_manifest(manifest, cfg.manifest)
    rows = task_rows(manifest, cfg.classes, cfg.max_train_images, cfg.seed)
    segmenter_uri = getattr(cfg, "segmenter", None)
    segmenter = None
    if segmenter_uri:
        segmenter = tracking.load_registered(platform.tracking_uri, segmenter_uri, inference_device())
        dilation = cfg.dilation_px if cfg.dilation_px is not None else segmenter.card.preprocessing.dilation_px
        prep = Preprocessing.for_classifier(cfg.image_size, True, segmenter.name, segmenter.version, dilation)
    else:
        prep = Preprocessing.for_classifier(cfg.image_size)
    preprocess = Preprocess(prep, segmenter)
    bad: list = []
    images, fraction = preprocess.prepare(rows["uri"].tolist(), platform.storage, cfg.load_threads, bad=bad)
    check_unreadable(counts, [(uri, reason) for _, uri, reason in bad], len(rows), cfg.manifest)
    if bad:
        log.warning("%s: skipped %d unreadable images (first: %s)", cfg.manifest, len(bad), counts.unreadable_examples[0])
        rows = rows.drop(index=[i for i, _, _ in bad]).reset_index(drop=True)
    if segmenter is not None:
        rows["lung_fraction"] = fraction
    return Task(rows, images, prep, manifest, manifest_digest(manifest), preprocess, counts)


def initial_state(cfg: ClassifierTrainConfig, platform: PlatformConfig) -> tuple[dict | None, str]:
    """(state_dict or None, where it came from): a pretraining run's best checkpoint, a local
    weights file, or nothing (scratch)."""
    if isinstance(cfg, FinetuneConfig) and cfg.pretrain_run:
        model, _ = load_run_checkpoint(platform.tracking_uri, cfg.pretrain_run)
        return model.state_dict(), f"pretrain run {cfg.pretrain_run}"
    if cfg.init_weights:
        return read_state_file(cfg.init_weights), f"weights file {cfg.init_weights}"
    return None, "scratch"


def put_task(cfg: ClassifierTrainConfig, task: Task, init_state: dict | None) -> tuple[ray.ObjectRef, ray.ObjectRef | None]:
    """The train/val arrays and the initial weights, in Ray's object store (once, for many trials)."""
    data = by_split(task.rows, task.images, archive_weights(task.rows) if cfg.archive_balanced else None)
    missing = {"train", "val"} - set(data)
    if missing:
        raise DataContractError(f"{cfg.manifest}: no rows in split(s) {sorted(missing)}")
    few = {s: len(data[s][0]) for s in ("train", "val") if len(data[s][0]) < cfg.num_workers}
    if few:
        raise DataContractError(f"{cfg.manifest}: {few} images for {cfg.num_workers} workers: each needs one")
    return ray.put({k: data[k] for k in ("train", "val")}), (ray.put(init_state) if init_state is not None else None)


def make_trainer(cfg: ClassifierTrainConfig, platform: PlatformConfig, refs: tuple[ray.ObjectRef, ray.ObjectRef | None],
                 run_id: str | None, name: str, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer of the classifier loop on ``refs`` (from ``put_task``)."""
    data_ref, init_ref = refs
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "platform": platform, "run_id": run_id,
                           "data": data_ref, "init_state": init_ref},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=name, callbacks=callbacks, **ray_storage(cfg.storage_path, platform.storage),
                             failure_config=FailureConfig(max_failures=WORKER_RETRIES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                                                checkpoint_score_order="min")))


def fit(cfg: ClassifierTrainConfig, platform: PlatformConfig, refs: tuple, run_id: str,
        name: str) -> tuple[Result, float, pd.DataFrame]:
    """Train; returns the Ray Train result, the minutes it took and the per-epoch history. The
    history comes from the MLflow run, not ``result.metrics_dataframe``: in Ray Train V2 that
    holds only the epochs that saved a checkpoint."""
    started = time.perf_counter()
    result = make_trainer(cfg, platform, refs, run_id, name).fit()
    minutes = (time.perf_counter() - started) / 60
    history = tracking.metric_history(platform.tracking_uri, run_id,
                                      ["train_loss", "val_loss", "val_accuracy", "train_images_per_s"])
    return result, minutes, history


def run_key(job: str, cfg: ClassifierTrainConfig, platform: PlatformConfig) -> str:
    """The key a rerun of the same command finds its unfinished run by (``tracking.resumable_run``)."""
    return tracking.resume_key(job, config_to_dict(cfg), manifest_digest(read_manifest(cfg.manifest, platform.storage)))


def log_task(platform: PlatformConfig, run_id: str, cfg: ClassifierTrainConfig, task: Task, init_origin: str) -> None:
    """Parameters (readable), the resolved config and the manifest as the run's input dataset."""
    uri = platform.tracking_uri
    counts = {f"n_{s}": int((task.rows["split"] == s).sum()) for s in ("train", "val", "test")}
    tracking.log_params(uri, run_id, {**config_to_dict(cfg), "init": init_origin, "manifest_sha256": task.digest,
                                      "lung_mask": task.preprocessing.lung_mask,
                                      "segmenter": task.preprocessing.segmenter_uri, **counts,
                                      **(task.counts.params() if task.counts else {})})
    if task.counts and task.counts.unreadable:
        tracking.log_dict(uri, run_id, {"unreadable": task.counts.unreadable_examples}, "data/unreadable.json")
    tracking.log_dict(uri, run_id, config_to_plain(cfg), "config.yaml")
    if getattr(cfg, "tuned_by", None):
        tracking.client(uri).set_tag(run_id, "cxr.tuned_by", cfg.tuned_by)
    tracking.log_dataset(uri, run_id, task.manifest, cfg.manifest, Path(cfg.manifest).stem, task.digest)


# --- pretrain --------------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig, platform: PlatformConfig) -> dict:
    """Pretrain on the source task and log the best checkpoint to the run (``cxr finetune
    --pretrain-run``). Returns run_id, meta (best epoch), minutes, images_per_s, epochs (run;
    fewer than configured where ``time_limit_s`` stopped it)."""
    check_classifier(cfg)
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    with tracking.resumable_run(platform.tracking_uri, platform.experiments["pretrain"], cfg.run_name,
                                run_key("pretrain", cfg, platform), tags={"cxr.job": "pretrain"},
                                artifact_location=platform.artifact_location) as (run_id, resumed):
        task = load_task(cfg, platform)
        init_state, init_origin = initial_state(cfg, platform)
        if not (resumed and tracking.has_params(platform.tracking_uri, run_id)):    # an attempt may have died first
            log_task(platform, run_id, cfg, task, init_origin)
        result, minutes, history = fit(cfg, platform, put_task(cfg, task, init_state), run_id, f"pretrain-{run_id[:8]}")
        with result.get_best_checkpoint("val_loss", "min").as_directory() as folder:
            log_checkpoint(platform.tracking_uri, run_id, folder)
            meta = json.loads((Path(folder) / META).read_text())
        images_per_s = float(history["train_images_per_s"].median())
        tracking.log_metrics(platform.tracking_uri, run_id, {
            "train_minutes": minutes, "best_val_loss": meta["val_loss"], "best_val_accuracy": meta["val_accuracy"],
            "best_epoch": meta["epoch"], "median_train_images_per_s": images_per_s})
        tracking.log_figures(platform.tracking_uri, run_id, {"loss_curves.png": loss_curves(history, extra="val_accuracy")},
                             "plots")
    return {"run_id": run_id, "meta": meta, "minutes": minutes, "images_per_s": images_per_s, "epochs": len(history)}


# --- finetune --------------------------------------------------------------------------------------

def classifier_card(cfg: ClassifierTrainConfig, task: Task, meta: dict, init_origin: str, report: dict,
                    screening: dict | None) -> ModelCard:
    """The card of a fine-tuned classifier: everything serving needs, and what it was tested on."""
    return ModelCard(
        task="classifier", architecture=cfg.model, labels=tuple(cfg.classes),
        input_shape=(3, cfg.image_size, cfg.image_size),
        output="one logit per label; softmax gives the class probabilities",
        preprocessing=task.preprocessing, model_kwargs=dict(meta["model_kwargs"]),
        operating_point=OperatingPoint(**screening) if screening else None,
        training_data=(DatasetDigest.of(Path(cfg.manifest).stem, cfg.manifest, task.digest, len(task.manifest),
                                                     task.rows),),
        metrics={"test": report, "best_val_loss": meta["val_loss"], "best_epoch": meta["epoch"]},
        init=init_origin,
        provenance={"settings": portable(config_to_plain(cfg)), "tuned_by": getattr(cfg, "tuned_by", None),
                    "pretrain_run": getattr(cfg, "pretrain_run", None), "code": tracking.code_state(),
                    "data_counts": task.counts.params() if task.counts else None}).validate()


def qc_views(cfg: FinetuneConfig, task: Task, platform: PlatformConfig) -> tuple[np.ndarray | None, list | None]:
    """The lateral films and CT slices (``cfg.qc_views``, train and val rows) as the task's
    images are made, and their kinds; (None, None) where there are none."""
    if not cfg.qc_views or ("://" not in cfg.qc_views and not Path(cfg.qc_views).exists()):
        return None, None
    views = read_manifest(cfg.qc_views, platform.storage)
    views = views[views["split"].isin(["train", "val"])]
    if views.empty:
        return None, None
    images, _ = task.preprocess.prepare(views["uri"].tolist(), platform.storage, cfg.load_threads)
    return images, views["view"].tolist()


def finetune(cfg: FinetuneConfig, platform: PlatformConfig) -> dict:
    """Fine-tune, choose the operating point on validation, evaluate the test split, log, and
    register (``cfg.register``). Returns run_id, version (or None), model_name, report,
    minutes, best_epoch."""
    check_classifier(cfg)
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    uri, name = platform.tracking_uri, platform.registered_models["classifier"]
    version = None
    with tracking.resumable_run(uri, platform.experiments["finetune"], cfg.run_name, run_key("finetune", cfg, platform),
                                tags={"cxr.job": "finetune"},
                                artifact_location=platform.artifact_location) as (run_id, resumed):
        task = load_task(cfg, platform)
        if not (task.rows["split"] == "test").any():
            raise ValueError(f"{cfg.manifest}: no test rows to evaluate")
        init_state, init_origin = initial_state(cfg, platform)
        if not (resumed and tracking.has_params(uri, run_id)):    # an attempt may have died before logging them
            log_task(platform, run_id, cfg, task, init_origin)
        result, minutes, history = fit(cfg, platform, put_task(cfg, task, init_state), run_id, f"finetune-{run_id[:8]}")
        with result.get_best_checkpoint("val_loss", "min").as_directory() as folder:
            model, meta = load_checkpoint(folder, inference_device())
        splits, rows = by_split(task.rows, task.images), task.rows
        screening = screening_threshold(model, splits["val"][0], rows[rows["split"] == "val"], cfg.classes,
                                        cfg.screening_specificity)
        report, figures, per_image = evaluate_classifier(model, splits["test"][0], rows[rows["split"] == "test"],
                                                         cfg.classes, cfg.n_boot, cfg.seed, screening=screening)
        tracking.log_metrics(uri, run_id, {**flat_metrics(report), "train_minutes": minutes,
                                           "best_val_loss": meta["val_loss"], "best_epoch": meta["epoch"]})
        tracking.log_dict(uri, run_id, report, "evaluation/test_metrics.json")
        tracking.log_dict(uri, run_id, per_image.to_dict(orient="records"), "evaluation/test_predictions.json")
        figures["loss_curves.png"] = loss_curves(history, extra="val_accuracy")
        tracking.log_figures(uri, run_id, figures, "plots")
        if cfg.register:
            card = classifier_card(cfg, task, meta, init_origin, report, screening)
            train = (rows["split"] == "train").to_numpy()
            val = (rows["split"] == "val").to_numpy()
            ages = rows.loc[train, "age_group"] if "age_group" in rows else ["unknown"] * int(train.sum())
            val_ages = rows.loc[val, "age_group"] if "age_group" in rows else None
            view_images, view_kinds = qc_views(cfg, task, platform)
            qc = fit_for_task(model, splits["train"][0], splits["val"][0], ages, val_ages, view_images, view_kinds)
            # What the screen answers on its validation films: the nights are compared with it.
            reference = fit_screen_reference(Component(model, card, qc=qc), task.preprocess.segmenter,
                                             rows.loc[val, "uri"].tolist(), platform.storage,
                                             f"{cfg.manifest} split val")
            version = tracking.register_model(uri, name, run_id, model, card, qc=qc, reference=reference)
    return {"run_id": run_id, "version": version, "model_name": name, "report": report, "minutes": minutes,
            "best_epoch": meta["epoch"]}
