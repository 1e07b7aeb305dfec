"""``cxr evaluate``: a registered classifier on any labeled manifest. Metrics with 95% bootstrap
intervals, the confusion matrix, ROC curves and Grad-CAM overlays, as JSON + PNG in ``--out``
and in an MLflow run."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from cxr import tracking
from cxr.classification import card_screening, inference_device
from cxr.config import EvaluateConfig, config_to_dict, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import absolute_uri
from cxr.evaluation import card_inputs, evaluate_classifier, flat_metrics, summary_line
from cxr.plots import loss_curves

log = logging.getLogger("cxr.jobs.evaluate")


def main(cfg: EvaluateConfig) -> int:
    platform = load_platform()
    uri = platform.tracking_uri
    manifest = read_manifest(absolute_uri(cfg.manifest), platform.storage)
    model, card, version = tracking.load_registered(uri, cfg.classifier, inference_device())
    classes = list(card["labels"])
    rows = manifest[manifest["label"].notna()]
    if cfg.split:
        rows = rows[rows["split"] == cfg.split]
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown or rows.empty:
        print(f"cxr evaluate: {cfg.manifest}: " + (f"labels {unknown} are not the model's {classes}" if unknown
              else f"no labeled rows{' in split ' + cfg.split if cfg.split else ''}"), file=sys.stderr)
        return 2
    rows = rows.assign(target=rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)).reset_index(drop=True)
    images = card_inputs(uri, card, rows, platform.storage, cfg.load_threads, cfg.segmenter)
    # The operating point fine-tuning chose on its validation split, if the card keeps one.
    chosen = card_screening(card)
    screening = ({"threshold": chosen["threshold"], "min_specificity": chosen["min_specificity"],
                  "chosen_on": f"the model card ({chosen['chosen_on']})"} if chosen else None)
    report, figures, per_image = evaluate_classifier(model, images, rows, classes, cfg.n_boot, cfg.seed,
                                                     cfg.batch_size, cfg.cam_examples, screening)
    history = tracking.metric_history(uri, version.run_id, ["train_loss", "val_loss", "val_accuracy"])
    if not history.empty:                # the training run's loss curves (the paper's Fig. 7)
        figures["loss_curves.png"] = loss_curves(history, extra="val_accuracy")
    report.update(classifier=cfg.classifier, classifier_version=str(version.version), manifest=cfg.manifest,
                  manifest_sha256=manifest_digest(manifest), split=cfg.split)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    per_image.to_csv(out / "predictions.csv", index=False)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=120)
    run_id = tracking.start_run(uri, platform.experiments["evaluate"], cfg.run_name, tags={
        "cxr.job": "evaluate", "cxr.classifier": f"{version.name}/{version.version}"},
        artifact_location=platform.artifact_location)
    tracking.log_params(uri, run_id, {**config_to_dict(cfg), "classifier_version": version.version})
    tracking.log_metrics(uri, run_id, flat_metrics(report, prefix=""))
    tracking.log_dict(uri, run_id, report, "metrics.json")
    tracking.log_figures(uri, run_id, figures, "plots")
    tracking.end_run(uri, run_id)
    print(f"evaluate {version.name} v{version.version} on {cfg.manifest}: {summary_line(report)}; "
          f"wrote {out}/metrics.json and plots; run {run_id}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
