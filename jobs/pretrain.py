"""``cxr pretrain``: the source task (kermany/train: normal / bacterial / viral) with Ray Train.
The best checkpoint (lowest validation loss) is logged to the MLflow run; ``cxr finetune
--pretrain-run RUN_ID`` starts from it."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from cxr import tracking
from cxr.config import PretrainConfig, config_to_dict, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.models import model_spec
from cxr.plots import loss_curves
from cxr.train.checkpoints import META
from jobs.classifier_training import fit, initial_state, load_task, put_task
from jobs.runtime import init_ray

log = logging.getLogger("cxr.jobs.pretrain")


def main(cfg: PretrainConfig) -> int:
    if model_spec(cfg.model).task != "classifier":
        print(f"cxr pretrain: {cfg.model} is not a classifier", file=sys.stderr)
        return 2
    r = run(cfg)
    meta = r["meta"]
    print(f"pretrain: best epoch {meta['epoch']} val loss {meta['val_loss']:.4f} val accuracy "
          f"{meta['val_accuracy']:.4f}; {r['images_per_s']:.1f} train images/s; "
          f"{r['minutes']:.1f} min; run {r['run_id']} (use: cxr finetune --pretrain-run {r['run_id']})")
    return 0


def run(cfg: PretrainConfig) -> dict:
    """Pretrain and log the best checkpoint; returns run_id, meta (best epoch), minutes, images_per_s."""
    platform = load_platform()
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    uri = platform.tracking_uri
    run_id = tracking.start_run(uri, platform.experiments["pretrain"], cfg.run_name, tags={"cxr.job": "pretrain"},
                                artifact_location=platform.artifact_location)
    ok = False
    try:
        init_ray()
        manifest = read_manifest(cfg.manifest, platform.storage)
        rows, images, _ = load_task(cfg, platform, manifest)
        init_state, init_origin = initial_state(cfg, platform)
        tracking.log_params(uri, run_id, {**config_to_dict(cfg), "init": init_origin, "n_train": int((rows["split"] == "train").sum()),
                                          "manifest_sha256": manifest_digest(manifest)})
        tracking.log_dict(uri, run_id, config_to_dict(cfg), "config.yaml")
        result, minutes, history = fit(cfg, platform, put_task(cfg, rows, images, init_state), run_id,
                                       f"pretrain-{run_id[:8]}")
        best = result.get_best_checkpoint("val_loss", "min")
        with best.as_directory() as folder:
            tracking.log_checkpoint(uri, run_id, folder)
            meta = json.loads((Path(folder) / META).read_text())
        tracking.log_metrics(uri, run_id, {"train_minutes": minutes, "best_val_loss": meta["val_loss"],
                                           "best_val_accuracy": meta["val_accuracy"], "best_epoch": meta["epoch"],
                                           "median_train_images_per_s": float(history["train_images_per_s"].median())})
        tracking.log_figures(uri, run_id, {"loss_curves.png": loss_curves(history, extra="val_accuracy")}, "plots")
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok)
    return {"run_id": run_id, "meta": meta, "minutes": minutes,
            "images_per_s": float(history["train_images_per_s"].median())}


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["pretrain", *sys.argv[1:]]))
