"""What a training command checks of its manifest before it trains: no patient and no image in
two splits, no split it does not know, and a bound on the images it cannot read. A breach is a
``DataContractError`` in one line; what is dropped is counted (``DataCounts``) and logged.

prepare-data checks the manifests it writes; these checks are for every manifest a training
command is given (a hand-made CSV, an old file, another team's export).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd

SPLITS = ("train", "val", "test")
# At most this share of a training set's images may be unreadable (skipped and counted); more
# means the data, not a few files, is broken.
MAX_UNREADABLE_SHARE = 0.02


class DataContractError(ValueError):
    """A manifest a model must not be trained on; the message says why in one line."""


@dataclass
class DataCounts:
    """What a training command was given and what it dropped, for the run's parameters."""

    rows: int = 0
    without_split: int = 0
    without_label: int = 0
    unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)

    def params(self) -> dict:
        return {f"data_{k}": v for k, v in asdict(self).items() if k != "unreadable_examples"}


def check_manifest(manifest: pd.DataFrame, what: str, label_column: str | None = "label") -> DataCounts:
    """Refuse unknown splits and leaks across splits; count rows without a split or a label."""
    counts = DataCounts(rows=len(manifest))
    split = manifest["split"] if "split" in manifest else pd.Series([None] * len(manifest), index=manifest.index)
    unknown = sorted(set(split.dropna()) - set(SPLITS))
    if unknown:
        n = int(split.isin(unknown).sum())
        raise DataContractError(f"{what}: {n} rows have split(s) {unknown}; a training manifest's splits are "
                                f"{list(SPLITS)}")
    counts.without_split = int(split.isna().sum())
    if label_column and label_column in manifest:
        counts.without_label = int(manifest[label_column].isna().sum())
    assigned = manifest[split.notna()]
    for column, kind in (("patient_id", "patient"), ("sha256", "image")):
        if column not in assigned:
            continue
        named = assigned[assigned[column].notna() & (assigned[column].astype(str).str.strip() != "")]   # "" is none
        spread = named.groupby(column)["split"].nunique()
        leaked = spread[spread > 1]
        if len(leaked):
            first = leaked.index[0]
            splits = sorted(named.loc[named[column] == first, "split"].unique())
            raise DataContractError(f"{what}: {len(leaked)} {kind}(s) in more than one split (e.g. {kind} "
                                    f"{str(first)[:24]!r} in {' and '.join(splits)}): a model would be tested on what "
                                    "it learnt; split by patient (cxr prepare-data does)")
    return counts


def check_unreadable(counts: DataCounts, bad: list[tuple[str, str]], total: int, what: str) -> None:
    """Count the images that could not be read; refuse past ``MAX_UNREADABLE_SHARE``."""
    counts.unreadable = len(bad)
    counts.unreadable_examples = [f"{uri}: {reason}" for uri, reason in bad[:5]]
    if total and len(bad) > MAX_UNREADABLE_SHARE * total:
        uri, reason = bad[0]
        raise DataContractError(f"{what}: {len(bad)} of {total} images cannot be read (more than "
                                f"{MAX_UNREADABLE_SHARE:.0%}; first: {uri}: {reason})")


def training_failure(e: BaseException) -> str:
    """One line for a training run Ray gave up on (after ``WORKER_RETRIES`` worker retries)."""
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray's message ends with the worker's own exception; that is the cause a person needs.
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1] if lines else "")
    return (f"training failed after its worker retries: {type(e).__name__}: {cause[:300]}; run the same command "
            "again to resume from its last checkpoint")
