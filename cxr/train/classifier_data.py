"""The classifier's data: task-manifest rows -> uint8 image arrays (lung-masked where a
segmenter is given) and integer labels, per split.

The task sets are small (dataset II: 1,051 images, 53 MB at 224 px; the source task: 4,759,
239 MB), so images are decoded once in the driver and shipped to the workers through Ray's
object store instead of being re-decoded every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from cxr.classification import load_letterboxed, lung_masked
from cxr.data.storage import StorageConfig

SPLITS = ("train", "val", "test")


def task_rows(manifest: pd.DataFrame, classes: Sequence[str], max_train_images: int | None = None,
              seed: int = 0) -> pd.DataFrame:
    """Rows with a split and a label, plus ``target`` (the label's index in ``classes``).

    A label that is not one of ``classes`` fails and lists both, rather than being dropped.
    """
    rows = manifest[manifest["split"].isin(SPLITS) & manifest["label"].notna()].copy()
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} in the manifest are not among classes {list(classes)}")
    rows["target"] = rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    if max_train_images:
        train = rows[rows["split"] == "train"]
        keep = train.sample(n=min(max_train_images, len(train)), random_state=seed).index
        rows = rows[(rows["split"] != "train") | rows.index.isin(keep)]
    return rows.reset_index(drop=True)


def build_arrays(rows: pd.DataFrame, size: int, storage: StorageConfig | None = None, threads: int = 8,
                 segmenter: nn.Module | None = None, segmenter_size: int = 256,
                 dilation_px: int = 3) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N, 1, size, size) uint8, lung area fractions or None) for ``rows["uri"]``,
    lung-masked by ``segmenter`` when one is given."""
    uris = rows["uri"].tolist()
    if segmenter is None:
        (images,) = load_letterboxed(uris, [size], storage, threads)
        return images, None
    images, small = load_letterboxed(uris, [size, segmenter_size], storage, threads)
    return lung_masked(images, small, segmenter, dilation_px)


def by_split(rows: pd.DataFrame, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, targets)} for every split present."""
    out = {}
    for split in SPLITS:
        picked = (rows["split"] == split).to_numpy()
        if picked.any():
            out[split] = (np.ascontiguousarray(images[picked]), rows["target"].to_numpy()[picked])
    return out
