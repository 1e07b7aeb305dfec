"""The classifier's data: task-manifest rows with integer labels, and the images that
``cxr.screen.Preprocess.prepare`` made of them, per split.

The task sets are small (dataset II: 1,051 images, 53 MB at 224 px; the source task: 4,759,
239 MB), so images are decoded once in the driver and shipped to the workers through Ray's
object store instead of being re-decoded every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

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


def by_split(rows: pd.DataFrame, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, targets)} for every split present."""
    out = {}
    for split in SPLITS:
        picked = (rows["split"] == split).to_numpy()
        if picked.any():
            out[split] = (np.ascontiguousarray(images[picked]), rows["target"].to_numpy()[picked])
    return out
