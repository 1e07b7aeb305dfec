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


def night_trend(nights: pd.DataFrame, psi_limit: float) -> plt.Figure:
    """The last nights of a scores table (``cxr.workflows.monitor.trend``): films scored, the
    shares of errors, flags and screen-positives, and the largest drift (PSI) against its limit;
    nights that raised an alarm in red."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    x = np.arange(len(nights))
    alarm = (nights["alarm"] != "none").to_numpy()
    axes[0].bar(x, nights["scored"], color=np.where(alarm, "tab:red", "tab:blue"))
    axes[0].set_ylabel("films scored")
    for column, colour in (("error_share", "tab:red"), ("flagged_share", "tab:orange"),
                           ("positive_share", "tab:purple")):
        axes[1].plot(x, nights[column], marker="o", color=colour, label=column.replace("_", " "))
    axes[1].set_ylabel("share"), axes[1].set_ylim(0, 1), axes[1].legend(fontsize=8)
    axes[2].plot(x, nights["max_psi"], marker="o", color="tab:gray")
    axes[2].scatter(x[alarm], nights["max_psi"].to_numpy()[alarm], color="tab:red", zorder=3, label="alarm")
    axes[2].axhline(psi_limit, color="tab:red", linestyle="--", linewidth=1, label=f"limit {psi_limit}")
    axes[2].set_ylabel("largest PSI"), axes[2].legend(fontsize=8)
    labels = [str(j)[:15] for j in nights["job_id"]]
    for ax in axes:
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return fig
