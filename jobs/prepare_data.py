"""``cxr prepare-data``: build Parquet manifests with patient-grouped, stratified splits
(``cxr.workflows.data.prepare_manifests``). Exit 2 on a bad data root or option, 1 if a patient
leaks across splits."""

from __future__ import annotations

import sys

from cxr.config import PrepareDataConfig, load_platform
from cxr.workflows.data import prepare_manifests


def main(cfg: PrepareDataConfig) -> int:
    try:
        summary = prepare_manifests(cfg, load_platform())
    except (FileNotFoundError, ValueError) as e:
        print(f"cxr prepare-data: {e}", file=sys.stderr)
        return 2
    for name, s in summary.items():
        print(f"{name + '.parquet':32s} {s['rows']:6d} rows  {s['unreadable']} unreadable  "
              f"patient leaks: {s['patient_leaks']}  digest {s['digest'][:12]}")
    print(f"wrote {len(summary)} manifests and summary.json to {cfg.out.rstrip('/')}")
    return 1 if any(s["patient_leaks"] for s in summary.values()) else 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["prepare-data", *sys.argv[1:]]))
