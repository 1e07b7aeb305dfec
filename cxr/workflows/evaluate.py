"""Evaluation workflow: a registered classifier on any labeled manifest, through its card's
preprocessing and operating point; JSON + PNG in a folder and in an MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr import tracking
from cxr.classification import inference_device
from cxr.config import EvaluateConfig, PlatformConfig, config_to_dict
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.evaluation import card_inputs, card_screening, evaluate_classifier, flat_metrics
from cxr.plots import loss_curves


class EvaluationInputError(ValueError):
    """The manifest does not fit the model (labels it does not know, no labeled rows)."""


def evaluate_registered(cfg: EvaluateConfig, platform: PlatformConfig) -> dict:
    """Returns the report (with the model version and manifest digest), plus ``run_id`` and ``out``."""
    uri = platform.tracking_uri
    manifest = read_manifest(absolute_uri(cfg.manifest), platform.storage)
    classifier = tracking.load_registered(uri, cfg.classifier, inference_device())
    card = classifier.card
    classes = list(card.labels)
    rows = manifest[manifest["label"].notna()]
    if cfg.split:
        rows = rows[rows["split"] == cfg.split]
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown or rows.empty:
        raise EvaluationInputError(f"{cfg.manifest}: " + (
            f"labels {unknown} are not the model's {classes}" if unknown
            else f"no labeled rows{' in split ' + cfg.split if cfg.split else ''}"))
    rows = rows.assign(target=rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)).reset_index(drop=True)
    images = card_inputs(uri, card, rows, platform.storage, cfg.load_threads, cfg.segmenter)
    report, figures, per_image = evaluate_classifier(classifier.model, images, rows, classes, cfg.n_boot, cfg.seed,
                                                     cfg.batch_size, cfg.cam_examples, card_screening(card))
    run = tracking.resolve_version(uri, cfg.classifier).run_id
    history = tracking.metric_history(uri, run, ["train_loss", "val_loss", "val_accuracy"])
    if not history.empty:                # the training run's loss curves (the paper's Fig. 7)
        figures["loss_curves.png"] = loss_curves(history, extra="val_accuracy")
    report.update(classifier=cfg.classifier, classifier_version=classifier.version, manifest=cfg.manifest,
                  manifest_sha256=manifest_digest(manifest), split=cfg.split,
                  lung_mask=card.preprocessing.lung_mask, segmenter=cfg.segmenter or card.preprocessing.segmenter_uri)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    per_image.to_csv(out / "predictions.csv", index=False)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=120)
    with tracking.tracked_run(uri, platform.experiments["evaluate"], cfg.run_name, artifact_location=platform.artifact_location,
                              tags={"cxr.job": "evaluate", "cxr.classifier": f"{classifier.name}/{classifier.version}"}) as run_id:
        tracking.log_params(uri, run_id, {**config_to_dict(cfg), "classifier_version": classifier.version})
        tracking.log_dataset(uri, run_id, manifest, cfg.manifest, Path(cfg.manifest).stem, report["manifest_sha256"],
                             context="evaluation")
        tracking.log_metrics(uri, run_id, flat_metrics(report, prefix=""))
        tracking.log_dict(uri, run_id, report, "metrics.json")
        tracking.log_figures(uri, run_id, figures, "plots")
    return {"report": report, "run_id": run_id, "out": str(out), "name": classifier.name,
            "version": classifier.version}
