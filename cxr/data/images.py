"""One image from its URI: bytes -> decoded grayscale -> letterboxed square."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr.data.decode import DecodeLimits, decode_film, decode_image
from cxr.data.letterbox import letterbox
from cxr.data.storage import StorageConfig, read_bytes


def load_image(uri: str, size: int, storage: StorageConfig | None = None,
               limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """(size, size) uint8, gray-padded, decoded only down to ``size``. Raises BadImageError
    for input that is not an image."""
    data = read_bytes(uri, storage, limits.max_bytes)
    film = decode_film(data, uri, limits, size)
    return letterbox(film.gray, size, shape=(film.height, film.width))


def load_mask(uri: str, size: int, storage: StorageConfig | None = None) -> np.ndarray:
    """(size, size) uint8 in {0, 1}: a lung mask letterboxed like its image (padding is background)."""
    mask = decode_image(read_bytes(uri, storage), uri)
    boxed = letterbox(mask, size, fill=0, resample=Image.Resampling.NEAREST)
    return (boxed > 127).astype(np.uint8)
