"""Metrics. Segmentation: per-image Dice and its summary. Classification: scikit-learn metrics
with percentile-bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score,
                             roc_curve)


def dice_per_image(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice of binary (B, 1, H, W) masks, one value per image. Two empty masks score 1."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * inter / (total + eps), torch.ones_like(total))


def dice_summary(dice: pd.Series) -> dict[str, float]:
    """Mean, median, 5th percentile and count of per-image Dice."""
    values = dice.to_numpy(dtype=float)
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p05": float(np.percentile(values, 5)), "n": int(len(values))}


def mean_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def share_interval(hits, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The share of true ``hits`` with its 95% bootstrap interval and count: {"value", "low",
    "high", "n"}; None where there are no hits to count."""
    hits = np.asarray(hits, float)
    if not len(hits):
        return None
    low, high = mean_interval(hits, n_boot, seed)
    return {"value": float(hits.mean()), "low": low, "high": high, "n": int(len(hits))}


def dice_report(per_image: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``per_image`` has columns dice and source: summaries overall and per source."""
    report = {"all": dice_summary(per_image["dice"])}
    for source, group in per_image.groupby("source"):
        report[str(source)] = dice_summary(group["dice"])
    for source, summary in report.items():
        rows = per_image if source == "all" else per_image[per_image["source"] == source]
        summary["mean_ci_low"], summary["mean_ci_high"] = mean_interval(rows["dice"].to_numpy(dtype=float))
    return report


# --- classification ---------------------------------------------------------------------------

def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                           positive: str = "covid") -> dict[str, float]:
    """Flat scalar metrics (scikit-learn): accuracy, per-class precision/recall/F1, one-vs-rest
    AUROC, macro AUROC, and ``positive``-vs-rest sensitivity/specificity. Undefined values
    (a class absent from ``y_true``) are NaN."""
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    present = set(np.unique(y_true).tolist())
    for i, name in enumerate(classes):
        defined = i in present
        out[f"precision_{name}"] = float(precision[i]) if (y_pred == i).any() else float("nan")
        out[f"recall_{name}"] = float(recall[i]) if defined else float("nan")
        out[f"f1_{name}"] = float(f1[i]) if defined else float("nan")
        one_vs_rest = y_true == i
        out[f"auroc_{name}"] = (float(roc_auc_score(one_vs_rest, probs[:, i]))
                                if 0 < one_vs_rest.sum() < len(y_true) else float("nan"))
    aurocs = [out[f"auroc_{c}"] for c in classes]
    out["auroc_macro"] = float(np.mean(aurocs)) if not np.isnan(aurocs).any() else float("nan")
    if positive in classes:
        p = list(classes).index(positive)
        truth, called = y_true == p, y_pred == p
        out[f"{positive}_sensitivity"] = float((called & truth).sum() / truth.sum()) if truth.any() else float("nan")
        out[f"{positive}_specificity"] = float((~called & ~truth).sum() / (~truth).sum()) if (~truth).any() else float("nan")
    return out


def bootstrap_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int = 1000,
                      seed: int = 0, positive: str = "covid") -> dict[str, dict[str, float]]:
    """Every metric of ``classification_metrics`` with a 95% percentile-bootstrap interval:
    {name: {"value", "low", "high"}}. Resamples images with replacement, ``n_boot`` times."""
    point = classification_metrics(y_true, probs, classes, positive)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            idx = rng.integers(0, len(y_true), len(y_true))
            for k, v in classification_metrics(y_true[idx], probs[idx], classes, positive).items():
                draws[k].append(v)
        return {k: {"value": v,
                    "low": float(np.nanpercentile(draws[k], 2.5)) if not np.all(np.isnan(draws[k])) else float("nan"),
                    "high": float(np.nanpercentile(draws[k], 97.5)) if not np.all(np.isnan(draws[k])) else float("nan")}
                for k, v in point.items()}


def confusion(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix counts, rows = truth, columns = prediction."""
    return confusion_matrix(y_true, probs.argmax(axis=1), labels=list(range(n_classes)))


# --- a screening operating point ---------------------------------------------------------------

# The threshold that no probability reaches: the float32 just above 1. Probabilities are
# float32 where they are compared (serving, NumPy 2 casts a Python float to the array's
# float32), and the float64 just above 1 rounds to 1.0 there: a probability of exactly 1 would
# still be called positive.
ABOVE_ONE = float(np.nextafter(np.float32(1.0), np.float32(2.0)))


def float32_above(value: float) -> float:
    """The smallest float32 above ``value`` (as a Python float)."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))

def threshold_for_specificity(is_positive: np.ndarray, score: np.ndarray, min_specificity: float) -> float:
    """The score threshold (``score >= threshold`` calls positive) with the highest sensitivity
    among those whose specificity is at least ``min_specificity``, from scikit-learn's ROC
    curve. Meant for a validation split; the test split then measures it honestly."""
    fpr, tpr, thresholds = roc_curve(is_positive, score)
    allowed = np.flatnonzero(fpr <= 1 - min_specificity + 1e-12)   # never empty: (0, 0) at +inf
    return float(thresholds[allowed[np.argmax(tpr[allowed])]])


def screening_metrics(is_positive: np.ndarray, score: np.ndarray, threshold: float, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Sensitivity and specificity of ``score >= threshold``, each with a 95% percentile-bootstrap
    interval: {"sensitivity": {"value", "low", "high"}, "specificity": {...}, "n": ...}."""
    is_positive, called = np.asarray(is_positive, bool), np.asarray(score) >= threshold

    def rates(idx: np.ndarray) -> tuple[float, float]:
        t, c = is_positive[idx], called[idx]
        return ((c & t).sum() / t.sum() if t.any() else np.nan, (~c & ~t).sum() / (~t).sum() if (~t).any() else np.nan)

    point = rates(np.arange(len(is_positive)))
    rng = np.random.default_rng(seed)
    draws = np.array([rates(rng.integers(0, len(is_positive), len(is_positive))) for _ in range(n_boot)])
    out: dict = {"n": int(len(is_positive))}
    for j, name in enumerate(("sensitivity", "specificity")):
        finite = draws[:, j][np.isfinite(draws[:, j])]
        low, high = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
        out[name] = {"value": float(point[j]), "low": float(low), "high": float(high)}
    return out


def auroc_interval(is_positive: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC of ``score`` for ``is_positive`` (scikit-learn) with a 95% percentile-bootstrap
    interval, and the counts it rests on: {"value", "low", "high", "n_positive", "n_negative"}.
    Resamples that draw a single class are skipped."""
    is_positive, score = np.asarray(is_positive, bool), np.asarray(score, float)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(is_positive), len(is_positive))
        if 0 < is_positive[idx].sum() < len(idx):
            draws.append(roc_auc_score(is_positive[idx], score[idx]))
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"value": float(roc_auc_score(is_positive, score)), "low": float(low), "high": float(high),
            "n_positive": int(is_positive.sum()), "n_negative": int((~is_positive).sum())}
