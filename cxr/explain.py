"""Batched Grad-CAM for the classifier, and heatmap encoding.

For a head of global-average-pool -> (dropout) -> linear, the gradient of logit c with respect
to the layer4 activations A is W[c] / (h*w) at every position, so Grad-CAM's channel weights
are the class weights and Grad-CAM equals the class activation map:

    cam_c = ReLU(sum_k W[c, k] / (h*w) * A_k)

It comes out of the forward pass, with no backward pass and no hooks, in whatever dtype and on
whatever device the model runs. ``tests/test_explain.py`` checks it against the grad-cam package.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxr.models.classifier import head_weights, logits_and_features


def class_activation_maps(features: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) Grad-CAM of ``classes`` (B,) from layer4 ``features`` (B, K, h, w) and head ``weights`` (C, K).

    Divided by h*w like Grad-CAM's mean gradient, so the raw values, and the 1e-7 guard of the
    normalisation below, are exactly the grad-cam package's.
    """
    h, w = features.shape[-2:]
    alpha = (weights[classes] / (h * w)).to(features.dtype)      # (B, K)
    return F.relu(torch.einsum("bk,bkhw->bhw", alpha, features)).float()


def _min_max(cams: torch.Tensor) -> torch.Tensor:
    flat = cams.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = (flat.max(dim=1).values.view(-1, 1, 1) - low)
    return (cams - low) / (high + 1e-7)


def normalise_and_resize(cams: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1], bilinear resize to (size, size), and min-max scaling
    again (interpolation lowers the peak): the grad-cam package's steps, in the same order."""
    resized = F.interpolate(_min_max(cams)[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return _min_max(resized)


@torch.no_grad()
def predict_with_cam(model: nn.Module, inputs: torch.Tensor, cam_size: int,
                     classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (B, C) float32, heatmaps (B, cam_size, cam_size) float32 in [0, 1]).

    The heatmap is for ``classes`` if given, else for each image's predicted class.
    """
    logits, features = logits_and_features(model, inputs)
    probs = torch.softmax(logits.float(), dim=1)
    target = probs.argmax(dim=1) if classes is None else classes.to(probs.device)
    cams = class_activation_maps(features, head_weights(model), target)
    return probs, normalise_and_resize(cams, cam_size)


@torch.no_grad()
def screen_maps(model: nn.Module, inputs: torch.Tensor, cam_size: int, covid: int | None, choose=None):
    """One forward pass for serving: (probabilities (B, C), pooled features (B, K), the
    predicted class's heatmaps (B, S, S) in [0, 1], their scales (B,), and the same two for
    ``covid`` (or None)). A heatmap is its Grad-CAM divided by its largest value, the scale (in
    logit units per position): unlike the min-max scaling of ``predict_with_cam`` this keeps 0
    at 0, so map x scale is the Grad-CAM itself and maps of different images share one scale."""
    logits, features = logits_and_features(model, inputs)
    probs = torch.softmax(logits.float(), dim=1)
    weights = head_weights(model)

    def maps(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = class_activation_maps(features, weights, classes)
        scale = cams.flatten(1).amax(dim=1)
        resized = F.interpolate(cams[:, None], size=(cam_size, cam_size), mode="bilinear", align_corners=False)[:, 0]
        return (resized / (scale.view(-1, 1, 1) + 1e-7)).clamp(0, 1), scale

    # ``choose`` (probabilities -> class per image) names the class the first map explains:
    # the screen's label rule (cxr.screen.screen_label_index); the most probable by default.
    predicted, predicted_scale = maps(choose(probs) if choose is not None else probs.argmax(dim=1))
    covid_maps = maps(torch.full_like(probs[:, 0], covid, dtype=torch.long)) if covid is not None else (None, None)
    return probs, features.float().mean(dim=(2, 3)), predicted, predicted_scale, *covid_maps


def heatmap_to_uint8(heatmaps: torch.Tensor) -> np.ndarray:
    """(B, S, S) float in [0, 1] -> uint8 in [0, 255] (what scoring stores)."""
    return (heatmaps.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """One uint8 heatmap as PNG bytes."""
    # No optimize=True: on smooth 64 px heatmaps it cost 60% more time for the same size.
    buffer = io.BytesIO()
    Image.fromarray(heatmap).save(buffer, format="PNG")
    return buffer.getvalue()
