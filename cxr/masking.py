"""Lung masking: segmenter probabilities -> lung-masked images and a lung-area quality signal."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lung_masks(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary (B, 1, H, W) masks from segmenter probabilities."""
    return (probs >= threshold).to(probs.dtype)


def dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Square dilation by ``pixels`` (a max-pool), so the lung borders survive the cut."""
    if pixels <= 0:
        return masks
    return F.max_pool2d(masks, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def mask_lungs(images: torch.Tensor, probs: torch.Tensor, threshold: float = 0.5,
               dilation_px: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Set everything outside the (dilated) lungs to 0.

    ``images``: (B, C, H, W) letterboxed images; ``probs``: (B, 1, h, w) lung probabilities at
    the segmenter's size, resized here to H x W. Returns the masked images and the lung area
    fraction of each image (before dilation, at the segmenter's size), which scoring uses as a quality flag.
    """
    # The fraction is measured at the segmenter's own resolution, before any resize.
    fraction = lung_masks(probs.float(), threshold).flatten(1).mean(dim=1)
    if probs.shape[-2:] != images.shape[-2:]:
        probs = F.interpolate(probs.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    masks = lung_masks(probs.float(), threshold)
    keep = dilate(masks, dilation_px).to(images.dtype)
    return images * keep, fraction
