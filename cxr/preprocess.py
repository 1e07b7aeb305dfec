"""Model input normalisation, shared by training and scoring so they can never drift apart.

Bump PREPROCESS_VERSION whenever what a model sees changes; it is stored in the model card
(``cxr.card.Preprocessing``) and in every scored row. ``cxr.model_input.Preprocess`` composes these
with the letterbox and the lung mask into the one path from decoded image to model input.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch is imported where it runs, so the card and the scoring driver need none
    import torch

PREPROCESS_VERSION = "1"
SEGMENTER_MEAN, SEGMENTER_STD = 0.5, 0.25
# The classifier sees 3 identical channels with ImageNet statistics, so an optional ImageNet
# weights file (the paper's init) fits without change.
CLASSIFIER_MEAN, CLASSIFIER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def segmenter_input(images_uint8: "torch.Tensor") -> "torch.Tensor":
    """(B, 1, H, W) uint8 letterboxed images -> normalised float32."""
    return (images_uint8.float() / 255.0 - SEGMENTER_MEAN) / SEGMENTER_STD


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) uint8 (or float in [0, 255]) images -> (B, 3, H, W) normalised float32."""
    x = images.float() / 255.0
    mean, std = _classifier_stats(x.device)
    return (x.expand(-1, 3, -1, -1) - mean) / std


@functools.cache
def _classifier_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, copied to each device once: a fresh copy per batch
    is a blocking host-to-device transfer, which stalls a training step on the GPU."""
    import torch

    return (torch.tensor(CLASSIFIER_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CLASSIFIER_STD, device=device).view(1, 3, 1, 1))
