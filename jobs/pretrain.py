"""``cxr pretrain``: the source task (kermany/train: normal / bacterial / viral) with Ray Train.
The best checkpoint (lowest validation loss) is logged to the MLflow run; ``cxr finetune
--pretrain-run RUN_ID`` starts from it (``cxr.workflows.classifier.pretrain``)."""

from __future__ import annotations

import sys

from cxr.config import PretrainConfig, load_platform
from cxr.workflows.classifier import check_classifier, pretrain
from jobs.runtime import init_ray, run_training


def main(cfg: PretrainConfig) -> int:
    try:
        check_classifier(cfg)
    except ValueError as e:
        print(f"cxr pretrain: {e}", file=sys.stderr)
        return 2
    init_ray()
    r, code = run_training("pretrain", lambda: pretrain(cfg, load_platform()))
    if r is None:
        return code
    meta = r["meta"]
    print(f"pretrain: best epoch {meta['epoch']} val loss {meta['val_loss']:.4f} val accuracy "
          f"{meta['val_accuracy']:.4f}; {r['images_per_s']:.1f} train images/s; "
          f"{r['minutes']:.1f} min; run {r['run_id']} (use: cxr finetune --pretrain-run {r['run_id']})")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["pretrain", *sys.argv[1:]]))
