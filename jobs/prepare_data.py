"""``cxr prepare-data``: build Parquet manifests with patient-grouped, stratified splits."""

from __future__ import annotations

import json
import logging
import sys

import pandas as pd

from cxr.config import PrepareDataConfig, config_to_dict, load_platform
from cxr.data.manifest import add_sha256, csv_manifest, folder_manifest, write_manifest
from cxr.data.splits import assign_splits, leaks
from cxr.data.storage import write_bytes
from cxr.data.tasks import base_manifests, split_and_build_tasks

log = logging.getLogger("cxr.jobs.prepare_data")


def build(cfg: PrepareDataConfig) -> dict[str, pd.DataFrame]:
    """The manifests this config asks for, keyed by output name."""
    storage = load_platform().storage
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


def main(cfg: PrepareDataConfig) -> int:
    storage = load_platform().storage
    try:
        manifests = build(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"cxr prepare-data: {e}", file=sys.stderr)
        return 2
    summary = summarize(manifests)
    out = cfg.out.rstrip("/")
    for name, df in manifests.items():
        summary[name]["digest"] = write_manifest(df, f"{out}/{name}.parquet", storage, {"config": config_to_dict(cfg)})
    write_bytes(f"{out}/summary.json", json.dumps({"config": config_to_dict(cfg), "manifests": summary},
                                                   indent=2).encode(), storage)
    for name, s in summary.items():
        print(f"{name + '.parquet':32s} {s['rows']:6d} rows  {s['unreadable']} unreadable  "
              f"patient leaks: {s['patient_leaks']}  digest {s['digest'][:12]}")
    print(f"wrote {len(manifests)} manifests and summary.json to {out}")
    return 1 if any(s["patient_leaks"] for s in summary.values()) else 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["prepare-data", *sys.argv[1:]]))
