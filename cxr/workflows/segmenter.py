"""Segmenter workflow: train the lung UNet with Ray Train, evaluate the test split, log
everything to MLflow and register the best model with its card."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr import tracking
from cxr.card import DatasetDigest, ModelCard, Preprocessing, portable
from cxr.config import PlatformConfig, SegmenterTrainConfig, config_to_dict, config_to_plain
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.metrics import dice_report
from cxr.models import model_spec
from cxr.plots import loss_curves, mask_overlays
from cxr.segmentation import evaluate_segmenter
from cxr.train.checkpoints import load_checkpoint
from cxr.train.contract import check_manifest
from cxr.train.common import WORKER_RETRIES, ray_storage
from cxr.train.segmenter import train_loop_per_worker


def segmenter_card(cfg: SegmenterTrainConfig, manifest: pd.DataFrame, digest: str, report: dict, meta: dict) -> ModelCard:
    return ModelCard(
        task="segmenter", architecture=cfg.model, labels=("lung",), input_shape=(1, cfg.image_size, cfg.image_size),
        output="one logit per pixel; sigmoid >= 0.5 is lung",
        preprocessing=Preprocessing.for_segmenter(cfg.image_size, cfg.dilation_px),
        training_data=(DatasetDigest(Path(cfg.manifest).stem, portable(cfg.manifest), digest, len(manifest)),),
        metrics={"test_dice": report, "best_val_dice": meta["val_dice"], "best_epoch": meta["epoch"]}).validate()


def check_segmenter(cfg: SegmenterTrainConfig) -> None:
    if model_spec(cfg.model).task != "segmenter":
        raise ValueError(f"{cfg.model} is not a segmenter")


def train_segmenter(cfg: SegmenterTrainConfig, platform: PlatformConfig) -> dict:
    """Returns run_id, version (or None), model_name, report (Dice per source), train_seconds."""
    check_segmenter(cfg)
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    manifest = read_manifest(cfg.manifest, platform.storage)
    counts = check_manifest(manifest, cfg.manifest, label_column="mask_uri")
    digest = manifest_digest(manifest)
    uri, name = platform.tracking_uri, platform.registered_models["segmenter"]
    version = None
    key = tracking.resume_key("train-segmenter", config_to_dict(cfg), digest)
    with tracking.resumable_run(uri, platform.experiments["segmenter"], cfg.run_name, key,
                                tags={"cxr.job": "train-segmenter"},
                                artifact_location=platform.artifact_location) as (run_id, resumed):
        if not (resumed and tracking.has_params(uri, run_id)):    # an attempt may have died before logging them
            tracking.log_params(uri, run_id, {**config_to_dict(cfg), "manifest_sha256": digest, **counts.params()})
            tracking.log_dict(uri, run_id, config_to_plain(cfg), "config.yaml")
            tracking.log_dataset(uri, run_id, manifest, cfg.manifest, Path(cfg.manifest).stem, digest)
        started = time.perf_counter()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_to_dict(cfg), "platform": platform, "run_id": run_id},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(name=f"segmenter-{run_id[:8]}", **ray_storage(cfg.storage_path, platform.storage),
                                 failure_config=FailureConfig(max_failures=WORKER_RETRIES),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_dice",
                                                                    checkpoint_score_order="max")))
        result = trainer.fit()
        train_seconds = time.perf_counter() - started
        # Not result.metrics_dataframe: in Ray Train V2 it holds only the epochs that saved a checkpoint.
        history = tracking.metric_history(uri, run_id, ["train_loss", "val_loss", "val_dice", "train_images_per_s"])
        with result.get_best_checkpoint("val_dice", "max").as_directory() as folder:
            model, meta = load_checkpoint(folder)
        per_image, arrays = evaluate_segmenter(model, manifest[manifest["split"] == "test"], cfg.image_size,
                                               platform.storage)
        report = dice_report(per_image)
        _log_evaluation(uri, run_id, history, per_image, arrays, report, train_seconds, meta)
        if cfg.register:
            version = tracking.register_model(uri, name, run_id, model, segmenter_card(cfg, manifest, digest, report, meta))
    return {"run_id": run_id, "version": version, "model_name": name, "report": report, "train_seconds": train_seconds}


def _log_evaluation(uri: str, run_id: str, history: pd.DataFrame, per_image: pd.DataFrame, arrays: dict,
                    report: dict, train_seconds: float, meta: dict) -> None:
    metrics = {"train_minutes": train_seconds / 60, "best_val_dice": meta["val_dice"], "best_epoch": meta["epoch"]}
    for source, summary in report.items():
        metrics.update({f"test_dice_{stat}_{source}": v for stat, v in summary.items() if stat != "n"})
    tracking.log_metrics(uri, run_id, metrics)
    tracking.log_dict(uri, run_id, report, "evaluation/test_dice.json")
    tracking.log_dict(uri, run_id, per_image.to_dict(orient="records"), "evaluation/test_dice_per_image.json")
    tracking.log_figure(uri, run_id, loss_curves(history, extra="val_dice"), "plots/loss_curves.png")
    order = per_image["dice"].to_numpy().argsort()
    picks = list(order[:3]) + list(order[-3:])  # the worst and the best cases
    titles = [f"{per_image['source'].iat[i]} Dice {per_image['dice'].iat[i]:.3f}" for i in picks]
    tracking.log_figure(uri, run_id, mask_overlays(arrays["images"][picks], arrays["masks"][picks],
                                                   arrays["predicted"][picks], titles), "plots/test_overlays.png")
