"""Classifier inference on images that ``cxr.model_input.Preprocess`` prepared: batched
probabilities and Grad-CAM, on the device a driver has."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxr.explain import predict_with_cam
from cxr.preprocess import classifier_input


def inference_device() -> str:
    """Where a driver runs its own inference (lung masking of a training set, evaluation):
    the GPU when the process sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 32,
            cam_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, C) and, with ``cam_size``, Grad-CAM heatmaps (N, S, S) in [0, 1]
    of the predicted classes, for (N, 1, S, S) uint8 images."""
    device = next(model.parameters()).device
    model.eval()
    probs, cams = [], []
    for start in range(0, len(images), batch_size):
        x = classifier_input(torch.from_numpy(images[start:start + batch_size]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p, cam = predict_with_cam(model, x, cam_size or 7)
        probs.append(p.cpu().numpy())
        if cam_size:
            cams.append(cam.cpu().numpy())
    n_classes = model.fc[-1].out_features
    all_probs = np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32)
    return all_probs, (np.concatenate(cams) if cams else None) if cam_size else None
