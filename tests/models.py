"""Tiny models, really registered on the loopback MLflow with the cards training writes: for
tests of what uses models (masking, scoring, promotion, packaging), not of skill."""

from __future__ import annotations

import uuid

import torch

from cxr import tracking
from cxr.card import DatasetDigest, ModelCard, OperatingPoint, Preprocessing
from cxr.models import build_model

LABELS = ("covid", "normal", "bacterial", "viral")
KWARGS = {"num_classes": 4, "dropout": 0.5}


def unique(name: str) -> str:
    """A registered-model name no other test uses (tests never share versions or aliases)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def register_segmenter(tracking_uri: str, name: str, seed: int = 0) -> str:
    """An untrained unet-tiny at 64 px; returns models:/NAME/VERSION."""
    torch.manual_seed(seed)
    card = ModelCard(task="segmenter", architecture="unet-tiny", labels=("lung",), input_shape=(1, 64, 64),
                     output="one logit per pixel; sigmoid >= 0.5 is lung", preprocessing=Preprocessing.for_segmenter(64))
    with tracking.tracked_run(tracking_uri, "cxr-test-fixtures", f"tiny-segmenter-{name}") as run_id:
        version = tracking.register_model(tracking_uri, name, run_id, build_model("unet-tiny"), card)
    return f"models:/{name}/{version}"


# What the rigged classifiers say they learnt from: an archive and an image the sample does not hold.
ELSEWHERE = DatasetDigest("rigged", "rigged.parquet", "0" * 64, 1, {"elsewhere": 1}, ("0" * 64,), ("0" * 16,))


def transfer_claim(threshold: float, specificity: float = 0.95, sensitivity: float = 0.9) -> dict:
    """The card metrics ``cxr crossval --register`` writes for a threshold chosen out of archive."""
    def share(v):
        return {"value": v, "low": v - 0.02, "high": min(1.0, v + 0.02), "n": 500}
    rule = "pooled adult negatives"
    return {"operating_point": {"rule": rule, "threshold": threshold, "rules": {rule: {
        "threshold": threshold, "pooled_unseen": {"specificity_adult_negatives": share(specificity),
                                                  "sensitivity_covid": share(sensitivity)}}}}}


def register_classifier(tracking_uri: str, name: str, segmenter_uri: str | None, seed: int = 0,
                        always: str | None = None, threshold: float | None = 0.25, temperature: float = 1.0,
                        learnt: DatasetDigest | None = ELSEWHERE, metrics: dict | None = None) -> str:
    """An untrained resnet18-tiny at 64 px, lung-masked by ``segmenter_uri`` (None: whole
    images), with a COVID operating point at ``threshold`` on probabilities calibrated with
    ``temperature``; with ``always``, a head that always
    answers that label (a model of known quality). Its card says it learnt from ``learnt``
    and holds ``metrics``. Returns models:/NAME/VERSION."""
    torch.manual_seed(seed)
    model = build_model("resnet18-tiny", **KWARGS)
    if always:
        with torch.no_grad():
            model.fc[1].weight.zero_()
            model.fc[1].bias.copy_(torch.tensor([10.0 if c == always else 0.0 for c in LABELS]))
    if segmenter_uri:
        seg_name, seg_version = segmenter_uri[len("models:/"):].rsplit("/", 1)
        prep = Preprocessing.for_classifier(64, True, seg_name, seg_version, 3)
    else:
        prep = Preprocessing.for_classifier(64)
    card = ModelCard(task="classifier", architecture="resnet18-tiny", labels=LABELS, input_shape=(3, 64, 64),
                     output="one logit per label", preprocessing=prep, model_kwargs=KWARGS,
                     operating_point=(OperatingPoint(threshold, 0.85, "validation, all images (n=6)",
                                                     temperature=temperature)
                                      if threshold is not None else None),
                     training_data=(learnt,) if learnt else (), metrics=metrics or {})
    with tracking.tracked_run(tracking_uri, "cxr-test-fixtures", f"tiny-classifier-{name}") as run_id:
        version = tracking.register_model(tracking_uri, name, run_id, model, card)
    return f"models:/{name}/{version}"
