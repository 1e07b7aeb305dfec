"""Patient-grouped, label-stratified, deterministic splits.

Images are grouped before splitting: two images share a group when they share a patient, a
``near_duplicate_group`` (the same radiograph from two sources) or identical bytes (sha256).
Whole groups go to one split, so no patient and no duplicate ever sits in two splits.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

N_FOLDS = 20  # split fractions are multiples of 1/20 (5%)


def leakage_groups(df: pd.DataFrame, keys: tuple[str, ...] = ("patient_id", "near_duplicate_group", "sha256")) -> pd.Series:
    """A group id per row: connected components of rows linked by any shared non-null key."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in keys:
        if key not in df.columns:
            continue
        first_row: dict = {}
        for row, value in enumerate(df[key].tolist()):
            if pd.isna(value) or value == "":
                continue
            if value in first_row:
                a, b = find(row), find(first_row[value])
                if a != b:
                    parent[a] = b
            else:
                first_row[value] = row
    roots = [find(i) for i in range(len(df))]
    return pd.Series(pd.factorize(pd.Series(roots))[0], index=df.index, name="split_group")


def assign_splits(df: pd.DataFrame, fractions: Mapping[str, float], seed: int,
                  stratify: str = "label") -> pd.Series:
    """Split name per row. ``fractions`` maps split name to its share; shares are rounded to 5%.

    Uses scikit-learn's ``StratifiedGroupKFold`` over the leakage groups, then hands out whole
    folds to the splits, largest share last so it takes the remainder.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
    groups = leakage_groups(df)
    strata = df[stratify].fillna("unlabeled").astype(str) if stratify in df.columns else pd.Series("all", index=df.index)
    # Small manifests (the shipped sample) get coarser folds: scikit-learn needs at least one
    # stratum with a member per fold.
    n_folds = min(N_FOLDS, groups.nunique(), int(strata.value_counts().max()))
    if n_folds < len(fractions):
        raise ValueError(f"too few patients ({groups.nunique()}) to split into {sorted(fractions)}")
    folds = np.full(len(df), -1)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare strata (a single influenza case) cannot sit in every fold; that is expected.
        warnings.filterwarnings("ignore", message="The least populated class")
        for fold, (_, idx) in enumerate(cv.split(np.zeros(len(df)), strata.to_numpy(), groups.to_numpy())):
            folds[idx] = fold
    names = sorted(fractions, key=lambda k: fractions[k])
    fold_to_split, start = {}, 0
    for i, name in enumerate(names):
        count = n_folds - start if i == len(names) - 1 else max(1, round(fractions[name] * n_folds))
        for fold in range(start, start + count):
            fold_to_split[fold] = name
        start += count
    return pd.Series([fold_to_split[f] for f in folds], index=df.index, name="split")


def leaks(df: pd.DataFrame, column: str) -> dict[str, list[str]]:
    """Values of ``column`` found in more than one split: empty when the split is clean."""
    if column not in df.columns or "split" not in df.columns:
        return {}
    sub = df.dropna(subset=[column, "split"])
    sub = sub[sub[column] != ""]
    per_value = sub.groupby(column)["split"].nunique()
    bad = per_value[per_value > 1].index
    return {v: sorted(sub.loc[sub[column] == v, "split"].unique()) for v in bad}
