"""``cxr train-segmenter``: train the lung UNet with Ray Train, evaluate on the test split,
log everything to MLflow and register the best model as ``cxr-segmenter``."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import pandas as pd

from cxr import tracking
from cxr.config import SegmenterTrainConfig, config_to_dict, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.metrics import dice_report
from cxr.models import model_spec
from cxr.plots import loss_curves, mask_overlays
from cxr.preprocess import preprocessing_spec
from cxr.segmentation import evaluate_segmenter
from cxr.train.checkpoints import load_checkpoint
from jobs.runtime import init_ray, ray_storage

log = logging.getLogger("cxr.jobs.train_segmenter")


def main(cfg: SegmenterTrainConfig) -> int:
    if model_spec(cfg.model).task != "segmenter":
        print(f"cxr train-segmenter: {cfg.model} is not a segmenter", file=sys.stderr)
        return 2
    result = run(cfg)
    report, version = result["report"], result["version"]
    a = report["all"]
    print(f"test Dice mean {a['mean']:.4f} median {a['median']:.4f} p05 {a['p05']:.4f} (n={a['n']}); "
          + "; ".join(f"{s} {r['mean']:.4f}" for s, r in report.items() if s != "all")
          + f"; trained in {result['train_seconds'] / 60:.1f} min; run {result['run_id']}"
          + (f"; registered {result['model_name']} version {version}" if version else ""))
    return 0


def run(cfg: SegmenterTrainConfig) -> dict:
    """Train, evaluate, log and register; returns run_id, version (or None), report, train_seconds."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxr.train.segmenter import train_loop_per_worker

    platform = load_platform()
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    manifest = read_manifest(cfg.manifest, platform.storage)
    uri = platform.tracking_uri
    run_id = tracking.start_run(uri, platform.experiments["segmenter"], cfg.run_name,
                                tags={"cxr.job": "train-segmenter"}, artifact_location=platform.artifact_location)
    ok = False
    try:
        tracking.log_params(uri, run_id, {**config_to_dict(cfg), "manifest_sha256": manifest_digest(manifest)})
        tracking.log_dict(uri, run_id, config_to_dict(cfg), "config.yaml")
        init_ray()
        started = time.perf_counter()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_to_dict(cfg), "platform": platform, "run_id": run_id},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(name=f"segmenter-{run_id[:8]}", **ray_storage(cfg.storage_path, platform.storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_dice",
                                                                    checkpoint_score_order="max")))
        result = trainer.fit()
        train_seconds = time.perf_counter() - started
        # Not result.metrics_dataframe: in Ray Train V2 it holds only the epochs that saved a checkpoint.
        history = tracking.metric_history(uri, run_id, ["train_loss", "val_loss", "val_dice", "train_images_per_s"])
        best = result.get_best_checkpoint("val_dice", "max")
        with best.as_directory() as folder:
            model, meta = load_checkpoint(folder)
            test_rows = manifest[manifest["split"] == "test"]
            per_image, arrays = evaluate_segmenter(model, test_rows, cfg.image_size, platform.storage)
            report = dice_report(per_image)
            _log_evaluation(uri, run_id, history, per_image, arrays, report, train_seconds, meta)
            version = None
            if cfg.register:
                card = {
                    "task": "segmenter", "architecture": cfg.model, "labels": ["lung"],
                    "input": {"shape": [1, cfg.image_size, cfg.image_size], "dtype": "float32"},
                    "output": "one logit per pixel; sigmoid >= 0.5 is lung",
                    "preprocessing": preprocessing_spec("segmenter", cfg.image_size),
                    "mask_dilation_px": cfg.dilation_px,
                    "training_manifest_sha256": manifest_digest(manifest),
                    "metrics": {"test_dice": report, "best_val_dice": meta["val_dice"], "best_epoch": meta["epoch"]},
                }
                version = tracking.register_model(
                    uri, platform.registered_models["segmenter"], run_id, folder, card,
                    (1, cfg.image_size, cfg.image_size), (1, cfg.image_size, cfg.image_size), "lung_logits")
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok)
    return {"run_id": run_id, "version": version, "report": report, "train_seconds": train_seconds,
            "model_name": platform.registered_models["segmenter"]}


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


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["train-segmenter", *sys.argv[1:]]))
