"""The classifier's data: task-manifest rows with integer labels, and the images that
``cxr.model_input.Preprocess.prepare`` made of them, per split.

The task sets are small (dataset II: 1,051 images, 53 MB at 224 px; the source task: 4,759,
239 MB), so images are decoded once in the driver and shipped to the workers through Ray's
object store instead of being re-decoded every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxr.train.contract import DataContractError

SPLITS = ("train", "val", "test")


def task_rows(manifest: pd.DataFrame, classes: Sequence[str], max_train_images: int | None = None,
              seed: int = 0) -> pd.DataFrame:
    """Rows with a split and a label, plus ``target`` (the label's index in ``classes``).

    A label that is not one of ``classes`` fails and lists both, rather than being dropped.
    """
    rows = manifest[manifest["split"].isin(SPLITS) & manifest["label"].notna()].copy()
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise DataContractError(f"labels {unknown} in the manifest are not among classes {list(classes)}")
    rows["target"] = rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    if max_train_images:
        train = rows[rows["split"] == "train"]
        keep = train.sample(n=min(max_train_images, len(train)), random_state=seed).index
        rows = rows[(rows["split"] != "train") | rows.index.isin(keep)]
    return rows.reset_index(drop=True)


def archive_weights(rows: pd.DataFrame) -> np.ndarray:
    """Per-image weights that make every archive weigh the same within each split: 1 / the
    number of the split's images from the image's archive, scaled to mean 1. Without this, the
    largest archive (Kermany's children, here) sets most of what the loss rewards."""
    if "archive" not in rows or rows["archive"].isna().any():
        raise ValueError("archive-balanced training needs an archive for every row (manifest schema 2)")
    count = rows.groupby(["split", "archive"])["uri"].transform("size").to_numpy(dtype=float)
    weights = 1.0 / count
    for split in rows["split"].unique():
        picked = (rows["split"] == split).to_numpy()
        weights[picked] *= picked.sum() / weights[picked].sum()
    return weights.astype(np.float32)


def by_split(rows: pd.DataFrame, images: np.ndarray,
             weights: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (images, targets, per-image loss weights)} for every split present; the weights
    are ones unless given (``archive_weights``)."""
    weights = np.ones(len(rows), dtype=np.float32) if weights is None else weights
    out = {}
    for split in SPLITS:
        picked = (rows["split"] == split).to_numpy()
        if picked.any():
            out[split] = (np.ascontiguousarray(images[picked]), rows["target"].to_numpy()[picked], weights[picked])
    return out
