"""The model-input path: a decoded film -> the classifier's input, as the classifier's card says.

``Preprocess`` is the only path from a decoded image to the classifier's input: training,
evaluation, promotion, scoring, the benchmark and the Python API all go through it, so that
nothing drifts between them. It is its own module so that training and evaluation need not
import the serving one (``cxr.screen``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cxr.card import Preprocessing
from cxr.data.decode import DecodeLimits
from cxr.data.images import decode_boxed
from cxr.data.errors import BadImageError, describe
from cxr.data.letterbox import decode_side, letterbox_pair
from cxr.data.storage import StorageConfig, read_bytes
from cxr.masking import lung_masks, mask_lungs
from cxr.package import Component
from cxr.preprocess import classifier_input, segmenter_input


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Preprocess:
    """Decoded image -> classifier input, as the classifier's card (``prep``) says: letterbox at its size
    (and at the segmenter's), lung-mask with the pinned segmenter when it was trained on lungs,
    normalise. The segmenter also gives each image's lung-area fraction, a quality signal,
    whether or not the classifier is masked."""

    def __init__(self, prep: Preprocessing, segmenter: Component | None = None):
        if prep.lung_mask:
            if segmenter is None:
                raise ValueError(f"the classifier was trained on lung-masked images ({prep.segmenter_uri}); "
                                 "give it that segmenter")
            pinned = (prep.segmenter_name, prep.segmenter_version)
            if segmenter.version is not None and (segmenter.name, segmenter.version) != pinned:
                raise ValueError(f"the classifier was trained on lungs cut by {prep.segmenter_uri}, not by "
                                 f"models:/{segmenter.name}/{segmenter.version}")
        self.prep = prep
        self.segmenter = segmenter
        self.size = prep.letterbox_size
        self.segmenter_size = segmenter.card.preprocessing.letterbox_size if segmenter else None

    @property
    def sizes(self) -> tuple[int, int | None]:
        return self.size, self.segmenter_size

    @property
    def decode_side(self) -> int:
        """The side films are decoded down to (``cxr.data.letterbox.decode_side``)."""
        return decode_side(self.sizes)

    def letterbox(self, gray: np.ndarray, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W) uint8 -> the classifier's and the segmenter's letterboxed images (CPU work);
        ``shape``: the film's own size where ``gray`` is a reduced decode of it."""
        return letterbox_pair(gray, self.sizes, self.prep.letterbox_fill, shape)

    def decoded(self, data: bytes, uri: str, limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, np.ndarray | None]:
        """A film's bytes -> its letterboxed images, decoded only down to ``decode_side``."""
        return decode_boxed(data, uri, limits, self.sizes, self.prep.letterbox_fill)[1]

    @torch.no_grad()
    def masked(self, images: torch.Tensor, seg_images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, S, S) uint8 letterboxed images -> (the model's images as float in [0, 255],
        each image's lung-area fraction or None without a segmenter). Runs on the images' device."""
        return self.with_lungs(images, seg_images)[:2]

    @torch.no_grad()
    def with_lungs(self, images: torch.Tensor, seg_images: torch.Tensor | None):
        """``masked``, and the binary lung masks (B, 1, s, s) at the segmenter's size, or None."""
        x = images.float()
        if self.segmenter is None or seg_images is None:
            return x, None, None
        seg = self.segmenter.model
        lung = torch.sigmoid(seg(segmenter_input(seg_images.to(images.device))).float())
        if self.prep.lung_mask:
            x, fraction = mask_lungs(x, lung, dilation_px=self.prep.dilation_px)
            return x.round(), fraction, lung_masks(lung)
        masks = lung_masks(lung)
        return x, masks.flatten(1).mean(dim=1), masks

    def __call__(self, images: torch.Tensor, seg_images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(classifier input (B, 3, S, S), lung fractions): ``masked`` then normalisation."""
        x, fraction = self.masked(images, seg_images)
        return classifier_input(x), fraction

    def prepare(self, uris: Sequence[str], storage: StorageConfig | None = None, threads: int = 8,
                batch_size: int = 32, bad: list | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """A labeled set's images as the model sees them before normalisation, (N, 1, S, S)
        uint8, and their lung fractions: what training augments and evaluation predicts on.
        A bad image raises ``BadImageError``; with a ``bad`` list, it is skipped and (index, uri,
        reason) appended there instead, and the arrays hold only the others."""
        limits = DecodeLimits()

        def one(item: tuple[int, str]):
            i, uri = item
            try:
                return self.decoded(read_bytes(uri, storage, limits.max_bytes), uri, limits)
            except BadImageError as e:
                if bad is None:
                    raise
                bad.append((i, uri, e.reason))
                return None
            except OSError as e:            # a file gone since the manifest was written
                if bad is None:
                    raise
                bad.append((i, uri, describe(e)))
                return None

        with ThreadPoolExecutor(max(1, threads)) as pool:
            boxed = [b for b in pool.map(one, list(enumerate(uris))) if b is not None]
        if bad:
            bad.sort()
        if not boxed:
            return np.zeros((0, 1, self.size, self.size), np.uint8), None
        images = np.stack([b[0] for b in boxed])[:, None]
        if self.segmenter is None:
            return images, None
        small = np.stack([b[1] for b in boxed])[:, None]
        device = next(self.segmenter.model.parameters()).device
        out, fractions = [], []
        for start in range(0, len(images), batch_size):
            # bf16 on a GPU, as ``Screen.infer`` runs the segmenter there: the same masks.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                x, f = self.masked(torch.from_numpy(images[start:start + batch_size]).to(device),
                                   torch.from_numpy(small[start:start + batch_size]).to(device))
            out.append(x.round().to(torch.uint8).cpu().numpy())
            fractions.append(f.cpu().numpy())
        return np.concatenate(out), np.concatenate(fractions)
