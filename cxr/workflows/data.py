"""Data workflow: the Parquet manifests a config asks for (curated data, a CSV, or a folder),
with patient-grouped splits, written with a summary of counts and leak checks."""

from __future__ import annotations

import json

import pandas as pd

from cxr.config import PlatformConfig, PrepareDataConfig, config_to_dict
from cxr.data.manifest import add_sha256, csv_manifest, folder_manifest, write_manifest
from cxr.data.splits import assign_splits, leaks
from cxr.data.storage import write_bytes
from cxr.data.tasks import base_manifests, split_and_build_tasks


def build_manifests(cfg: PrepareDataConfig, platform: PlatformConfig) -> dict[str, pd.DataFrame]:
    """The manifests this config asks for, keyed by output name. A missing data folder raises
    ``FileNotFoundError``, bad fractions ``ValueError``."""
    storage = platform.storage
    fractions = {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction, "test": cfg.test_fraction}
    if cfg.images:
        return {"manifest": add_sha256(folder_manifest(cfg.images, storage), storage, cfg.threads)}
    if cfg.csv:
        df = add_sha256(csv_manifest(cfg.csv, storage), storage, cfg.threads)
        df["split"] = assign_splits(df, fractions, cfg.seed)
        return {"manifest": df}
    root = cfg.resolved_data_root()
    for part in ("kermany", "covid", "lungseg"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root} has no {part}/ folder: set --data-root or $CXR_DATA")
    bases = {name: add_sha256(df, storage, cfg.threads) for name, df in base_manifests(root).items()}
    return split_and_build_tasks(bases, cfg.seed, fractions, cfg.source_val_fraction,
                                 cfg.source_exclude_shared_patients)


def summarize(manifests: dict[str, pd.DataFrame]) -> dict:
    """Rows, unreadable files, split x label counts and leak checks, per manifest."""
    summary = {}
    for name, df in manifests.items():
        df = df.reindex(columns=sorted(set(df.columns) | {"split", "label"}))
        counts = df.fillna({"split": "-", "label": "-"}).groupby(["split", "label"]).size()
        summary[name] = {
            "rows": len(df),
            "unreadable": int(df["sha256"].isna().sum()),
            "counts": {f"{s}/{l}": int(n) for (s, l), n in counts.items()},
            "patient_leaks": len(leaks(df, "patient_id")),
        }
    return summary


def prepare_manifests(cfg: PrepareDataConfig, platform: PlatformConfig) -> dict:
    """Build, write (``cfg.out``: folder or s3:// prefix) and summarise; returns the summary per
    manifest, each with the digest it was written with."""
    manifests = build_manifests(cfg, platform)
    summary = summarize(manifests)
    out = cfg.out.rstrip("/")
    for name, df in manifests.items():
        summary[name]["digest"] = write_manifest(df, f"{out}/{name}.parquet", platform.storage,
                                                 {"config": config_to_dict(cfg)})
    write_bytes(f"{out}/summary.json", json.dumps({"config": config_to_dict(cfg), "manifests": summary},
                                                   indent=2).encode(), platform.storage)
    return summary
