"""What ``cxr pretrain``, ``cxr finetune`` and ``cxr tune`` share: the Ray Train trainer of the
classifier loop, and the data and initial weights it is given."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import ray
from ray.train import CheckpointConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr import tracking
from cxr.classification import inference_device
from cxr.config import ClassifierTrainConfig, FinetuneConfig, PlatformConfig, config_to_dict
from cxr.models.classifier import read_state_file
from cxr.train.classifier import train_loop_per_worker
from cxr.train.classifier_data import build_arrays, by_split, task_rows
from jobs.runtime import ray_storage

log = logging.getLogger(__name__)


def load_task(cfg: ClassifierTrainConfig, platform: PlatformConfig,
              manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(rows, images, masking info) of the task manifest (``cfg.manifest``, already read: the
    jobs also hash it); lung-masked for a finetune config with a segmenter. The masking info
    names the segmenter version, for the model card."""
    rows = task_rows(manifest, cfg.classes, cfg.max_train_images, cfg.seed)
    segmenter_uri = getattr(cfg, "segmenter", None)
    if not segmenter_uri:
        images, _ = build_arrays(rows, cfg.image_size, platform.storage, cfg.load_threads)
        return rows, images, {"lung_mask": False}
    segmenter, card, version = tracking.load_registered(platform.tracking_uri, segmenter_uri, inference_device())
    dilation = cfg.dilation_px if cfg.dilation_px is not None else int(card.get("mask_dilation_px", 3))
    images, fraction = build_arrays(rows, cfg.image_size, platform.storage, cfg.load_threads, segmenter,
                                    int(card["input"]["shape"][-1]), dilation)
    rows["lung_fraction"] = fraction
    info = {"lung_mask": True, "segmenter": segmenter_uri, "segmenter_name": version.name,
            "segmenter_version": str(version.version), "dilation_px": dilation,
            "segmenter_preprocessing_sha256": card["preprocessing"]["sha256"]}
    return rows, images, info


def initial_state(cfg: ClassifierTrainConfig, platform: PlatformConfig) -> tuple[dict | None, str]:
    """(state_dict or None, where it came from): a pretraining run's best checkpoint, a local
    weights file, or nothing (scratch)."""
    if isinstance(cfg, FinetuneConfig) and cfg.pretrain_run:
        model, _ = tracking.load_run_checkpoint(platform.tracking_uri, cfg.pretrain_run)
        return model.state_dict(), f"pretrain run {cfg.pretrain_run}"
    if cfg.init_weights:
        return read_state_file(cfg.init_weights), f"weights file {cfg.init_weights}"
    return None, "scratch"


def put_task(cfg: ClassifierTrainConfig, rows: pd.DataFrame, images: np.ndarray,
             init_state: dict | None) -> tuple[ray.ObjectRef, ray.ObjectRef | None]:
    """The train/val arrays and the initial weights, in Ray's object store (once, for many trials)."""
    data = by_split(rows, images)
    missing = {"train", "val"} - set(data)
    if missing:
        raise ValueError(f"{cfg.manifest}: no rows in split(s) {sorted(missing)}")
    return ray.put({k: data[k] for k in ("train", "val")}), (ray.put(init_state) if init_state is not None else None)


def fit(cfg: ClassifierTrainConfig, platform: PlatformConfig, task: tuple[ray.ObjectRef, ray.ObjectRef | None],
        run_id: str, name: str) -> tuple[Result, float, pd.DataFrame]:
    """Train on ``task``; returns the Ray Train result, the minutes it took and the per-epoch
    history. The history comes from the MLflow run, not ``result.metrics_dataframe``: in Ray
    Train V2 that holds only the epochs that saved a checkpoint."""
    started = time.perf_counter()
    result = make_trainer(cfg, platform, task, run_id, name).fit()
    minutes = (time.perf_counter() - started) / 60
    history = tracking.metric_history(platform.tracking_uri, run_id,
                                      ["train_loss", "val_loss", "val_accuracy", "train_images_per_s"])
    return result, minutes, history


def make_trainer(cfg: ClassifierTrainConfig, platform: PlatformConfig, task: tuple[ray.ObjectRef, ray.ObjectRef | None],
                 run_id: str | None, name: str, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer of the classifier loop on ``task`` (from ``put_task``)."""
    data_ref, init_ref = task
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "platform": platform, "run_id": run_id,
                           "data": data_ref, "init_state": init_ref},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=name, callbacks=callbacks, **ray_storage(cfg.storage_path, platform.storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                                                checkpoint_score_order="min")))
