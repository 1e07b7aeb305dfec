"""Letterbox: scale to fit a square and pad with gray, so nothing is distorted (the paper)."""

from __future__ import annotations

import numpy as np
from PIL import Image

PAD_VALUE = 128
# Films are decoded down to this many times the largest letterbox size, no further
# (``cxr.data.decode``): the letterbox's antialiased resize makes the last step, as it does for
# a whole decode. Decoding straight to the model's size left a block average where the whole
# path has a triangle filter: the shipped screen's probabilities moved by up to 0.027 on a
# non-square film (0.008 with this margin).
DECODE_MARGIN = 2


def decode_side(sizes: tuple[int, int | None]) -> int:
    """The side films are decoded down to for letterboxes of ``sizes`` (the classifier's and
    the segmenter's)."""
    return DECODE_MARGIN * max(s for s in sizes if s)


def letterbox(image: np.ndarray, size: int, fill: int = PAD_VALUE,
              resample: Image.Resampling = Image.Resampling.BILINEAR, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Fit a (H, W) uint8 image into (size, size), centred, keeping its aspect ratio.

    Pillow's resize filters scale their support with the reduction factor, so downscaling a
    large radiograph is anti-aliased. ``shape``: the film's own (H, W) where ``image`` is that
    film decoded at a reduced size (``cxr.data.decode``): the box is sized from the film, so a
    reduced decode fills exactly the rows and columns a whole one would (sized from the
    reduced image, the short side could round one row off).
    """
    if image.ndim != 2:
        raise ValueError(f"letterbox expects a (H, W) grayscale array, got shape {image.shape}")
    h, w = shape or image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = image if (nh, nw) == image.shape else np.asarray(
        Image.fromarray(image).resize((nw, nh), resample), dtype=np.uint8)
    out = np.full((size, size), fill, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def letterbox_pair(gray: np.ndarray, sizes: tuple[int, int | None], fill: int,
                   shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The classifier's and (with a second size) the segmenter's letterboxed images: the CPU
    half of ``cxr.model_input.Preprocess``, alone so that decode tasks, which hold no models (and
    import no torch), can run it."""
    size, segmenter_size = sizes
    return (letterbox(gray, size, fill, shape=shape),
            letterbox(gray, segmenter_size, fill, shape=shape) if segmenter_size else None)
