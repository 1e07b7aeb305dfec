"""A registered segmenter's Dice on JSRT, an archive it never trained on (issue 14), beside its
own test split (Montgomery and Shenzhen) for comparison.

    python -m experiments.segmenter_external --model models:/cxr-segmenter@champion \\
        --lungseg out/manifests/lungseg.parquet --out docs/results/segmenter-jsrt.json

JSRT's 247 films (``$CXR_DATA/external/jsrt``, SCR lung masks) are letterboxed to the size the
segmenter's card records, as in training. Prints and writes, per archive: mean Dice with its 95%
bootstrap interval, median, 5th percentile and n. Exit 1 if the data or the model is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from cxr.config import default_data_root, load_platform


def evaluate(model_uri: str, data_root: str, lungseg: str | None, limit: int | None = None) -> dict:
    from cxr import tracking
    from cxr.data.manifest import jsrt_manifest, read_manifest
    from cxr.metrics import dice_report
    from cxr.segmentation import evaluate_segmenter

    platform = load_platform()
    component = tracking.load_registered(platform.tracking_uri, model_uri)
    size = component.card.preprocessing.letterbox_size
    rows = [jsrt_manifest(Path(data_root))]
    if lungseg:
        own = read_manifest(lungseg, platform.storage)
        rows.append(own[own["split"] == "test"])
    rows = pd.concat(rows, ignore_index=True)
    if limit:
        rows = rows.groupby("source", group_keys=False).head(limit)
    per_image, _ = evaluate_segmenter(component.model, rows, size, platform.storage)
    from cxr.workflows.benchmark import machine

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "model": f"{component.name} v{component.version}", "model_uri": model_uri, "image_size": size,
            "trained_on": [d.__dict__ for d in component.card.training_data],
            "dice": dice_report(per_image)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models:/cxr-segmenter@champion", help="registered segmenter")
    p.add_argument("--data", default=None, help="curated data root (default $CXR_DATA or ../shared/data)")
    p.add_argument("--lungseg", default=None, help="the lungseg manifest of its training, for its own test split")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per archive (quick runs)")
    p.add_argument("--out", default="out/segmenter-jsrt.json", help="the JSON to write")
    args = p.parse_args(argv)
    root = args.data or default_data_root()
    if not (Path(root) / "external" / "jsrt" / "pairs.csv").exists():
        print(f"segmenter_external: no external/jsrt under {root} (set CXR_DATA)", file=sys.stderr)
        return 1
    try:
        result = evaluate(args.model, root, args.lungseg, args.limit)
    except Exception as e:  # noqa: BLE001 - a missing model or server: one line, exit 1
        print(f"segmenter_external: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for archive, d in result["dice"].items():
        print(f"{archive:12s} n={d['n']:4d}  Dice {d['mean']:.3f} [{d['mean_ci_low']:.3f}, {d['mean_ci_high']:.3f}]  "
              f"median {d['median']:.3f}  p05 {d['p05']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
