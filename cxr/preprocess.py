"""Model input normalisation, shared by training and scoring so they can never drift apart.

Bump PREPROCESS_VERSION whenever what a model sees changes; it is stored in the model card and
in every scored row.
"""

from __future__ import annotations

import hashlib
import json

import torch

PREPROCESS_VERSION = "1"
SEGMENTER_MEAN, SEGMENTER_STD = 0.5, 0.25


def segmenter_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) uint8 letterboxed images -> normalised float32."""
    return (images_uint8.float() / 255.0 - SEGMENTER_MEAN) / SEGMENTER_STD


def preprocessing_spec(kind: str, size: int) -> dict:
    """What the model card records about the input, with a hash to compare cards by."""
    spec = {"version": PREPROCESS_VERSION, "kind": kind, "letterbox_size": size, "letterbox_fill": 128,
            "grayscale": "8-bit, decoded from JPEG/PNG/TIFF/DICOM (VOI LUT, MONOCHROME1 inverted)"}
    if kind == "segmenter":
        spec.update(channels=1, mean=SEGMENTER_MEAN, std=SEGMENTER_STD, scale="x/255")
    spec["sha256"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return spec
