"""Classifier inputs and inference: images decoded once at the sizes the models need, lung
masking by a segmenter, and batched prediction with Grad-CAM.

Shared by fine-tuning, evaluation and scoring, so that what a model sees is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from cxr.data.decode import DecodeLimits, decode_image
from cxr.data.letterbox import letterbox
from cxr.data.storage import StorageConfig, read_bytes
from cxr.explain import predict_with_cam
from cxr.masking import mask_lungs
from cxr.preprocess import classifier_input
from cxr.segmentation import predict_probs


def inference_device() -> str:
    """Where a driver runs its own inference (lung masking of a training set, evaluation):
    the GPU when the process sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def card_screening(card: dict) -> dict | None:
    """The COVID operating point a classifier's model card keeps ({"threshold",
    "min_specificity", "chosen_on"}, chosen by ``cxr.evaluation.screening_threshold`` when it
    was fine-tuned), or None for a card without one."""
    return card.get("metrics", {}).get("test", {}).get("screening") or None


def load_letterboxed(uris: Sequence[str], sizes: Sequence[int], storage: StorageConfig | None = None,
                     threads: int = 8) -> list[np.ndarray]:
    """Decode each image once and letterbox it at every size: one (N, 1, S, S) uint8 array per size.

    For training and evaluation manifests, whose images were checked by prepare-data: a bad
    image raises ``BadImageError`` (scoring handles bad images row by row instead).
    """
    limits = DecodeLimits()

    def one(uri: str) -> list[np.ndarray]:
        gray = decode_image(read_bytes(uri, storage, limits.max_bytes), uri, limits)
        return [letterbox(gray, s) for s in sizes]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        boxed = list(pool.map(one, uris))
    return [np.stack([b[i] for b in boxed])[:, None] if boxed else np.zeros((0, 1, s, s), np.uint8)
            for i, s in enumerate(sizes)]


def lung_masked(images: np.ndarray, segmenter_images: np.ndarray, segmenter: nn.Module,
                dilation_px: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``images`` (N, 1, S, S) uint8 with the lungs the segmenter finds in
    ``segmenter_images`` (the same images at its own size). Returns the masked uint8 images and
    each image's lung area fraction."""
    probs = predict_probs(segmenter, torch.from_numpy(segmenter_images), batch_size)
    masked, fraction = mask_lungs(torch.from_numpy(images).float(), probs, dilation_px=dilation_px)
    return masked.round().to(torch.uint8).numpy(), fraction.numpy()


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
