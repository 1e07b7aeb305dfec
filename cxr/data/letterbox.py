"""Letterbox: scale to fit a square and pad with gray, so nothing is distorted (the paper)."""

from __future__ import annotations

import numpy as np
from PIL import Image

PAD_VALUE = 128


def letterbox(image: np.ndarray, size: int, fill: int = PAD_VALUE,
              resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Fit a (H, W) uint8 image into (size, size), centred, keeping its aspect ratio.

    Pillow's resize filters scale their support with the reduction factor, so downscaling a
    large radiograph is anti-aliased.
    """
    if image.ndim != 2:
        raise ValueError(f"letterbox expects a (H, W) grayscale array, got shape {image.shape}")
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = image if (nh, nw) == (h, w) else np.asarray(
        Image.fromarray(image).resize((nw, nh), resample), dtype=np.uint8)
    out = np.full((size, size), fill, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def letterbox_pair(gray: np.ndarray, sizes: tuple[int, int | None], fill: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The classifier's and (with a second size) the segmenter's letterboxed images: the CPU
    half of ``cxr.model_input.Preprocess``, alone so that decode tasks, which hold no models (and
    import no torch), can run it."""
    size, segmenter_size = sizes
    return letterbox(gray, size, fill), (letterbox(gray, segmenter_size, fill) if segmenter_size else None)
