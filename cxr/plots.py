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


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str]) -> plt.Figure:
    """Counts, rows = truth, columns = prediction (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> plt.Figure:
    """One-vs-rest ROC curve per class (scikit-learn's display)."""
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for i, name in enumerate(classes):
        truth = y_true == i
        if 0 < truth.sum() < len(truth):
            RocCurveDisplay.from_predictions(truth, probs[:, i], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
    fig.tight_layout()
    return fig


def cam_overlays(images: np.ndarray, heatmaps: np.ndarray, titles: list[str]) -> plt.Figure:
    """One panel per case: the model's input image with its Grad-CAM heatmap over it (Fig. 8)."""
    n = max(1, len(images))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, title in zip(axes.flat, images, heatmaps, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1,
                  extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig
