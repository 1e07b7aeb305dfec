"""The segmenter's dataset: lungseg rows decoded once into memory, augmented per sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cxr.data.augment import segmentation_augment
from cxr.data.images import load_image, load_mask
from cxr.data.storage import StorageConfig
from cxr.preprocess import segmenter_input


class SegmentationDataset(Dataset):
    """(image, mask) pairs: normalised float (1, S, S) image and float {0, 1} (1, S, S) mask.

    The set is small (704 pairs, 46 MB at 256 px), so decoding it once beats re-decoding
    every epoch.
    """

    def __init__(self, rows: pd.DataFrame, size: int, augment: bool, storage: StorageConfig | None = None):
        self.images = torch.from_numpy(np.stack([load_image(u, size, storage) for u in rows["uri"]]))[:, None]
        self.masks = torch.from_numpy(np.stack([load_mask(u, size, storage) for u in rows["mask_uri"]]))[:, None]
        self.sources = rows["source"].tolist()
        self.transform = segmentation_augment() if augment else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i])
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return segmenter_input(image.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor).float()
