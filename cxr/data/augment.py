"""Augmentation. Geometric transforms move an image and its mask together (torchvision v2
treats ``tv_tensors.Mask`` with nearest interpolation); intensity changes touch the image only."""

from __future__ import annotations

from torchvision.transforms import v2


def segmentation_augment() -> v2.Transform:
    return v2.Compose([
        v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])
