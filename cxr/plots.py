"""Figures for MLflow and reports (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def loss_curves(history: pd.DataFrame, extra: str | None = None) -> plt.Figure:
    """Train and validation loss per epoch (the paper's Fig. 7); ``extra`` adds a second panel."""
    panels = 2 if extra and extra in history else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(history["epoch"], history["train_loss"], color="tab:red", label="train loss")
    ax.plot(history["epoch"], history["val_loss"], color="tab:orange", label="validation loss")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend()
    if panels == 2:
        axes[0, 1].plot(history["epoch"], history[extra], color="tab:blue")
        axes[0, 1].set_xlabel("epoch"), axes[0, 1].set_ylabel(extra)
    fig.tight_layout()
    return fig


def mask_overlays(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, titles: list[str]) -> plt.Figure:
    """One row per case: image, true mask (green), predicted mask (red)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        for j, (overlay, label) in enumerate([(None, "image"), (truth[i], "true mask"), (predicted[i], "predicted")]):
            ax = axes[i, j]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            if overlay is not None:
                color = (0, 1, 0, 0.35) if j == 1 else (1, 0, 0, 0.35)
                rgba = np.zeros((*overlay.shape, 4))
                rgba[overlay > 0] = color
                ax.imshow(rgba)
            ax.set_title(f"{label}" + (f"\n{titles[i]}" if j == 0 else ""), fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return fig
