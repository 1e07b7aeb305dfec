"""One image from its URI: bytes -> decoded grayscale -> letterboxed square."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr.data.decode import DecodeLimits, Film, decode_film, decode_image
from cxr.data.letterbox import PAD_VALUE, decode_side, letterbox, letterbox_pair
from cxr.data.storage import StorageConfig, read_bytes


def decode_boxed(data: bytes, uri: str, limits: DecodeLimits, sizes: tuple[int, int | None],
                 fill: int) -> tuple[Film, tuple[np.ndarray, np.ndarray | None]]:
    """A film's bytes -> the film (with its own size) and its letterboxes at ``sizes`` (the
    classifier's and the segmenter's), decoded only down to ``decode_side(sizes)``: the one
    path from bytes to model-sized images, for the decode tasks (which import no torch) and
    ``cxr.model_input.Preprocess``."""
    film = decode_film(data, uri, limits, decode_side(sizes))
    return film, letterbox_pair(film.gray, sizes, fill, (film.height, film.width))


def load_image(uri: str, size: int, storage: StorageConfig | None = None,
               limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """(size, size) uint8, gray-padded, decoded as the models' inputs are (``decode_boxed``).
    Raises BadImageError for input that is not an image."""
    return decode_boxed(read_bytes(uri, storage, limits.max_bytes), uri, limits, (size, None), PAD_VALUE)[1][0]


def load_mask(uri: str, size: int, storage: StorageConfig | None = None) -> np.ndarray:
    """(size, size) uint8 in {0, 1}: a lung mask letterboxed like its image (padding is background)."""
    mask = decode_image(read_bytes(uri, storage), uri)
    boxed = letterbox(mask, size, fill=0, resample=Image.Resampling.NEAREST)
    return (boxed > 127).astype(np.uint8)
