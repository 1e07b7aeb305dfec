"""Metrics and plots. Segmentation: per-image Dice and its summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


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


def dice_report(per_image: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``per_image`` has columns dice and source: summaries overall and per source."""
    report = {"all": dice_summary(per_image["dice"])}
    for source, group in per_image.groupby("source"):
        report[str(source)] = dice_summary(group["dice"])
    return report
