"""``cxr train-segmenter``: train the lung UNet with Ray Train, evaluate on the test split,
log everything to MLflow and register the best model as ``cxr-segmenter``
(``cxr.workflows.segmenter.train_segmenter``)."""

from __future__ import annotations

import sys

from cxr.config import SegmenterTrainConfig, load_platform
from cxr.workflows.segmenter import check_segmenter, train_segmenter
from jobs.runtime import init_ray, run_training


def main(cfg: SegmenterTrainConfig) -> int:
    try:
        check_segmenter(cfg)
    except ValueError as e:
        print(f"cxr train-segmenter: {e}", file=sys.stderr)
        return 2
    init_ray()
    result, code = run_training("train-segmenter", lambda: train_segmenter(cfg, load_platform()))
    if result is None:
        return code
    report, version = result["report"], result["version"]
    a = report["all"]
    print(f"test Dice mean {a['mean']:.4f} median {a['median']:.4f} p05 {a['p05']:.4f} (n={a['n']}); "
          + "; ".join(f"{s} {r['mean']:.4f}" for s, r in report.items() if s != "all")
          + f"; trained in {result['train_seconds'] / 60:.1f} min; run {result['run_id']}"
          + (f"; registered {result['model_name']} version {version}" if version else ""))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["train-segmenter", *sys.argv[1:]]))
