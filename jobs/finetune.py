"""``cxr finetune``: dataset II (4- or 3-class, paper or de-confounded), lung-masked by the
registered segmenter, from a pretraining run, a weights file or scratch. Evaluates the test
split with bootstrap intervals and registers the best model as ``cxr-classifier``."""

from __future__ import annotations

import dataclasses
import logging
import sys

from cxr import tracking
from cxr.classification import inference_device
from cxr.config import FinetuneConfig, config_to_dict, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.evaluation import evaluate_classifier, flat_metrics, screening_threshold, summary_line
from cxr.models import model_spec
from cxr.plots import loss_curves
from cxr.preprocess import preprocessing_spec
from cxr.train.checkpoints import load_checkpoint
from cxr.train.classifier_data import by_split
from jobs.classifier_training import fit, initial_state, load_task, put_task
from jobs.runtime import init_ray

log = logging.getLogger("cxr.jobs.finetune")


def main(cfg: FinetuneConfig) -> int:
    if model_spec(cfg.model).task != "classifier":
        print(f"cxr finetune: {cfg.model} is not a classifier", file=sys.stderr)
        return 2
    r = run(cfg)
    print(f"finetune: test {summary_line(r['report'])}; best epoch {r['best_epoch']}; {r['minutes']:.1f} min; "
          f"run {r['run_id']}" + (f"; registered {r['model_name']} version {r['version']}" if r["version"] else ""))
    return 0


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune, evaluate, log and register; returns run_id, version (or None), report, minutes, best_epoch."""
    platform = load_platform()
    cfg = dataclasses.replace(cfg, manifest=absolute_uri(cfg.manifest))
    uri = platform.tracking_uri
    run_id = tracking.start_run(uri, platform.experiments["finetune"], cfg.run_name, tags={"cxr.job": "finetune"},
                                artifact_location=platform.artifact_location)
    ok, version = False, None
    try:
        init_ray()
        manifest = read_manifest(cfg.manifest, platform.storage)
        rows, images, masking = load_task(cfg, platform, manifest)
        init_state, init_origin = initial_state(cfg, platform)
        digest = manifest_digest(manifest)
        tracking.log_params(uri, run_id, {**config_to_dict(cfg), "init": init_origin, "manifest_sha256": digest,
                                          **{f"masking_{k}": v for k, v in masking.items()},
                                          **{f"n_{s}": int((rows["split"] == s).sum()) for s in ("train", "val", "test")}})
        tracking.log_dict(uri, run_id, config_to_dict(cfg), "config.yaml")
        result, minutes, history = fit(cfg, platform, put_task(cfg, rows, images, init_state), run_id,
                                       f"finetune-{run_id[:8]}")
        with result.get_best_checkpoint("val_loss", "min").as_directory() as folder:
            model, meta = load_checkpoint(folder, inference_device())
            test = rows["split"] == "test"
            if not test.any():
                raise ValueError(f"{cfg.manifest}: no test rows to evaluate")
            splits, val = by_split(rows, images), rows["split"] == "val"
            screening = screening_threshold(model, splits["val"][0], rows[val], cfg.classes, cfg.screening_specificity)
            report, figures, per_image = evaluate_classifier(model, splits["test"][0], rows[test], cfg.classes,
                                                             cfg.n_boot, cfg.seed, screening=screening)
            tracking.log_metrics(uri, run_id, {**flat_metrics(report), "train_minutes": minutes,
                                               "best_val_loss": meta["val_loss"], "best_epoch": meta["epoch"]})
            tracking.log_dict(uri, run_id, report, "evaluation/test_metrics.json")
            tracking.log_dict(uri, run_id, per_image.to_dict(orient="records"), "evaluation/test_predictions.json")
            figures["loss_curves.png"] = loss_curves(history, extra="val_accuracy")
            tracking.log_figures(uri, run_id, figures, "plots")
            if cfg.register:
                card = {
                    "task": "classifier", "architecture": cfg.model, "labels": list(cfg.classes),
                    "model_kwargs": meta["model_kwargs"],
                    "input": {"shape": [3, cfg.image_size, cfg.image_size], "dtype": "float32"},
                    "output": "one logit per label; softmax gives the class probabilities",
                    "preprocessing": preprocessing_spec("classifier", cfg.image_size, **masking),
                    "init": init_origin, "training_manifest": cfg.manifest, "training_manifest_sha256": digest,
                    "metrics": {"test": report, "best_val_loss": meta["val_loss"], "best_epoch": meta["epoch"]},
                }
                version = tracking.register_model(uri, platform.registered_models["classifier"], run_id, folder, card,
                                                  (3, cfg.image_size, cfg.image_size), (len(cfg.classes),), "logits")
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok)
    return {"run_id": run_id, "version": version, "report": report, "minutes": minutes, "best_epoch": meta["epoch"],
            "model_name": platform.registered_models["classifier"]}


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["finetune", *sys.argv[1:]]))
