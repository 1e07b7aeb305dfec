"""Evaluating a classifier: metrics with 95% bootstrap intervals (overall, and COVID-vs-rest on
adult images only, for the known pediatric/adult confound), and the figures that go with them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from cxr import tracking
from cxr.card import ModelCard
from cxr.classification import inference_device, predict
from cxr.crossval import archive_report
from cxr.operating_point import calibrated, fit_temperature, log_probabilities, worst_archive_threshold
from cxr.data.storage import StorageConfig
from cxr.metrics import (ABOVE_ONE, auroc_interval, bootstrap_metrics, confusion, screening_metrics,
                         threshold_for_specificity)
from cxr.plots import cam_overlays, confusion_matrix_figure, roc_figure
from cxr.model_input import Preprocess


def preprocess_for(tracking_uri: str, card: ModelCard, device: str, segmenter_uri: str | None = None) -> Preprocess:
    """The ``Preprocess`` of a registered classifier: its card's, with the segmenter it pins
    loaded (or, for an ablation, ``segmenter_uri`` in its place, which the preprocessing then names)."""
    prep = card.preprocessing
    if not prep.lung_mask:
        return Preprocess(prep)
    segmenter = tracking.load_registered(tracking_uri, segmenter_uri or prep.segmenter_uri, device)
    if segmenter_uri:
        prep = dataclasses.replace(prep, segmenter_name=segmenter.name, segmenter_version=segmenter.version)
    return Preprocess(prep, segmenter)


def card_inputs(tracking_uri: str, card: ModelCard, rows: pd.DataFrame, storage: StorageConfig | None = None,
                threads: int = 8, segmenter_uri: str | None = None) -> np.ndarray:
    """(N, 1, S, S) uint8 images of ``rows["uri"]`` as the registered classifier with ``card``
    saw its training images (``preprocess_for``)."""
    images, _ = preprocess_for(tracking_uri, card, inference_device(), segmenter_uri).prepare(
        rows["uri"].tolist(), storage, threads)
    return images


def card_screening(card: ModelCard) -> dict | None:
    """The card's operating point as ``evaluate_classifier``'s ``screening`` argument."""
    op = card.operating_point
    if op is None or op.label != "covid":
        return None
    return {"threshold": op.threshold, "min_specificity": op.min_specificity, "temperature": op.temperature,
            "chosen_on": f"the model card ({op.chosen_on})"}


MIN_PER_CLASS = 10   # images of each kind a split needs before a threshold is chosen on it
MIN_WITHIN = 5       # COVID and non-COVID images a subgroup needs before its AUROC is reported


def screening_threshold(model: nn.Module, images: np.ndarray, rows: pd.DataFrame, classes: Sequence[str],
                        min_specificity: float, batch_size: int = 32) -> dict | None:
    """A COVID-vs-rest operating point chosen on a validation split (``images``, ``rows``):
    first a temperature that calibrates the probabilities (``cxr.operating_point.fit_temperature``),
    then the threshold on the calibrated COVID probability. With an ``archive`` column, the
    threshold keeps specificity >= ``min_specificity`` in every archive of the split
    (``worst_archive_threshold``: a new hospital is one archive, not the pool); without one,
    the highest sensitivity at that specificity on the pool. Chosen on the split's adult
    images where it holds enough of both classes (adults are the population a screening goal
    is about, and pediatric negatives are easy), else on all of it. None without COVID or
    without both classes."""
    classes = list(classes)
    if "covid" not in classes or rows.empty:
        return None
    probs, _ = predict(model, images, batch_size)
    log_probs = log_probabilities(probs)
    targets = rows["target"].to_numpy()
    temperature = fit_temperature(log_probs, targets)
    positive, score = targets == classes.index("covid"), calibrated(log_probs, temperature)[:, classes.index("covid")]
    picked, population = np.ones(len(rows), bool), "all"
    if "age_group" in rows:
        adult = (rows["age_group"] == "adult").to_numpy()
        if positive[adult].sum() >= MIN_PER_CLASS and (~positive[adult]).sum() >= MIN_PER_CLASS:
            picked, population = adult, "adult"
    positive, score = positive[picked], score[picked]
    if positive.all() or not positive.any():
        return None
    if "archive" in rows and rows["archive"].notna().all():
        threshold, _ = worst_archive_threshold(positive, score, rows["archive"].to_numpy()[picked], min_specificity)
        rule = "every archive"
    else:
        # +inf (nothing reaches the specificity while calling anything positive) becomes the
        # smallest float32 above 1: no probability reaches it either, and JSON and MLflow take it.
        threshold = min(threshold_for_specificity(positive, score, min_specificity), ABOVE_ONE)
        rule = "pooled"
    return {"threshold": threshold, "min_specificity": min_specificity, "temperature": temperature,
            "chosen_on": f"validation, {population} images (n={len(positive)}), {rule}"}


def evaluate_classifier(model: nn.Module, images: np.ndarray, rows: pd.DataFrame, classes: Sequence[str],
                        n_boot: int = 1000, seed: int = 0, batch_size: int = 32,
                        cam_examples: int = 4, screening: dict | None = None) -> tuple[dict, dict, pd.DataFrame]:
    """(report, figures, per-image predictions) for ``images`` (N, 1, S, S) uint8 and ``rows``
    (``target``; ``age_group``, ``source`` and ``view`` where known). With ``screening`` (from
    ``screening_threshold``), the report also holds COVID-vs-rest sensitivity and specificity at
    that threshold; with ``source``/``view``, the COVID AUROC within them (``covid_auroc_within``)."""
    classes = list(classes)
    probs, _ = predict(model, images, batch_size)
    if screening and screening.get("temperature", 1.0) != 1.0:      # as serving reports them
        probs = calibrated(log_probabilities(probs), screening["temperature"])
    y = rows["target"].to_numpy()
    report = {"n": int(len(y)), "classes": classes,
              "metrics": bootstrap_metrics(y, probs, classes, n_boot, seed),
              "confusion_matrix": confusion(y, probs, len(classes)).tolist()}
    adult = (rows["age_group"] == "adult").to_numpy() if "age_group" in rows else np.zeros(len(y), bool)
    if adult.any() and "covid" in classes:
        sub = bootstrap_metrics(y[adult], probs[adult], classes, n_boot, seed)
        report["adult"] = {"n": int(adult.sum()),
                           **{k: sub[k] for k in ("covid_sensitivity", "covid_specificity", "auroc_covid")}}
    if "covid" in classes:
        positive, score = y == classes.index("covid"), probs[:, classes.index("covid")]
        if screening:
            report["screening"] = {**screening,
                                   "all": screening_metrics(positive, score, screening["threshold"], n_boot, seed)}
            if adult.any():
                report["screening"]["adult"] = screening_metrics(positive[adult], score[adult],
                                                                 screening["threshold"], n_boot, seed)
            if "archive" in rows and rows["archive"].notna().all():
                per = pd.DataFrame({"archive": rows["archive"].to_numpy(), "is_covid": positive, "p_covid": score})
                report["screening"]["archives"] = {str(a): archive_report(g, screening["threshold"], n_boot, seed)
                                                   for a, g in per.groupby("archive")}
        within = covid_auroc_within(rows, positive, score, n_boot, seed)
        if within:
            report["covid_auroc_within"] = within
    per_image = pd.DataFrame({"uri": rows["uri"].to_numpy(), "label": rows["label"].to_numpy(),
                              "predicted": [classes[i] for i in probs.argmax(1)],
                              **{f"p_{c}": probs[:, i] for i, c in enumerate(classes)}})
    figures = {"confusion_matrix.png": confusion_matrix_figure(np.array(report["confusion_matrix"]), classes),
               "roc.png": roc_figure(y, probs, classes)}
    if cam_examples > 0 and len(y):
        figures["gradcam.png"] = _cam_figure(model, images, y, probs, classes, cam_examples, batch_size)
    return report, figures, per_image


def covid_auroc_within(rows: pd.DataFrame, positive: np.ndarray, score: np.ndarray, n_boot: int = 1000,
                       seed: int = 0) -> dict[str, dict]:
    """COVID-vs-rest AUROC inside subgroups where a shortcut cannot separate the classes: each
    source archive (``source=...``), and each view among adult images (``adult, view=...``),
    that holds at least ``MIN_WITHIN`` images of both kinds.

    Where the label and the archive coincide (every COVID image comes from one collection, the
    negatives mostly from others), the overall AUROC can be the archive's signature; within one
    archive it cannot. The same for AP (often portable, supine) against PA films.
    """
    groups: dict[str, np.ndarray] = {}
    if "source" in rows:
        for source in sorted(rows["source"].dropna().unique()):
            groups[f"source={source}"] = (rows["source"] == source).to_numpy()
    if "view" in rows and "age_group" in rows:
        adult = (rows["age_group"] == "adult").to_numpy()
        for view in sorted(rows.loc[adult, "view"].dropna().unique()):
            groups[f"adult, view={view}"] = adult & (rows["view"] == view).to_numpy()
    return {name: auroc_interval(positive[member], score[member], n_boot, seed) for name, member in groups.items()
            if positive[member].sum() >= MIN_WITHIN and (~positive[member]).sum() >= MIN_WITHIN}


def _cam_figure(model: nn.Module, images: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str],
                k: int, batch_size: int):
    """Grad-CAM of the most confident correct and wrong predictions."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    order = np.argsort(-confidence)
    picks = [i for i in order if predicted[i] == y[i]][:k] + [i for i in order if predicted[i] != y[i]][:k]
    _, cams = predict(model, images[picks], batch_size, cam_size=images.shape[-1])
    titles = [f"{'ok' if predicted[i] == y[i] else 'WRONG'}: {classes[y[i]]} -> {classes[predicted[i]]} "
              f"({confidence[i]:.2f})" for i in picks]
    return cam_overlays(images[picks][:, 0], cams, titles)


def summary_line(report: dict) -> str:
    """One line for logs and the console."""
    m = report["metrics"]

    def ci(name: str) -> str:
        v = m[name]
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"

    parts = [f"n={report['n']}", f"accuracy {ci('accuracy')}"]
    if "f1_covid" in m:
        parts += [f"COVID F1 {ci('f1_covid')}", f"sensitivity {ci('covid_sensitivity')}",
                  f"specificity {ci('covid_specificity')}"]
    if "adult" in report:
        a = report["adult"]
        parts.append(f"adult (n={a['n']}) sensitivity {a['covid_sensitivity']['value']:.3f} "
                     f"specificity {a['covid_specificity']['value']:.3f}")
    if "screening" in report:
        sc = report["screening"]
        for population in ("all", "adult"):
            if population in sc:
                parts.append(f"at COVID threshold {sc['threshold']:.3f} (specificity >= {sc['min_specificity']} on "
                             f"{sc['chosen_on']}): {population} sensitivity {sc[population]['sensitivity']['value']:.3f} "
                             f"specificity {sc[population]['specificity']['value']:.3f}")
        for archive, rates in sc.get("archives", {}).items():
            cells = [f"{k} {rates[k]['value']:.3f}" for k in ("sensitivity", "specificity") if k in rates]
            parts.append(f"archive {archive} ({rates['n_covid']} COVID, {rates['n_other']} other): " + " ".join(cells))
    for group, v in report.get("covid_auroc_within", {}).items():
        parts.append(f"COVID AUROC within {group} ({v['n_positive']} vs {v['n_negative']}) "
                     f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
    return "; ".join(parts)


def flat_metrics(report: dict, prefix: str = "test_") -> dict[str, float]:
    """MLflow metrics: each value and its interval ends."""
    out = {}
    for name, v in report["metrics"].items():
        out[f"{prefix}{name}"] = v["value"]
        out[f"{prefix}{name}_ci_low"] = v["low"]
        out[f"{prefix}{name}_ci_high"] = v["high"]
    for name, v in report.get("adult", {}).items():
        if isinstance(v, dict):
            out[f"{prefix}adult_{name}"] = v["value"]
    screening = report.get("screening", {})
    if screening:
        out[f"{prefix}screening_threshold"] = screening["threshold"]
    for population in ("all", "adult"):
        for name in ("sensitivity", "specificity"):
            if population in screening:
                out[f"{prefix}screening_{population}_{name}"] = screening[population][name]["value"]
    for archive, rates in screening.get("archives", {}).items():
        for name in ("sensitivity", "specificity"):
            if name in rates:
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", archive)
                out[f"{prefix}screening_archive_{safe}_{name}"] = rates[name]["value"]
    for group, v in report.get("covid_auroc_within", {}).items():
        # MLflow metric names take letters, digits and _-./ only: "adult, view=PA" -> "adult_view_PA".
        out[f"{prefix}covid_auroc_within_{re.sub(r'[^A-Za-z0-9_./-]+', '_', group)}"] = v["value"]
    return out
