"""``cxr pretrain``: the source task (kermany/train: normal / bacterial / viral) with Ray Train.
The best checkpoint (lowest validation loss) is logged to the MLflow run; ``cxr finetune
--pretrain-run RUN_ID`` starts from it (``cxr.workflows.classifier.pretrain``)."""

from __future__ import annotations

import sys

from ray.train import TrainingFailedError

from cxr.config import PretrainConfig, load_platform
from cxr.train.contract import DataContractError, training_failure
from cxr.workflows.classifier import check_classifier, pretrain
from jobs.runtime import init_ray


def main(cfg: PretrainConfig) -> int:
    try:
        check_classifier(cfg)
    except ValueError as e:
        print(f"cxr pretrain: {e}", file=sys.stderr)
        return 2
    init_ray()
    try:
        r = pretrain(cfg, load_platform())
    except DataContractError as e:           # the data, in one line
        print(f"cxr pretrain: refused: {e}", file=sys.stderr)
        return 2
    except TrainingFailedError as e:         # Ray gave up after retrying the workers
        print(f"cxr pretrain: {training_failure(e)}", file=sys.stderr)
        return 1
    meta = r["meta"]
    print(f"pretrain: best epoch {meta['epoch']} val loss {meta['val_loss']:.4f} val accuracy "
          f"{meta['val_accuracy']:.4f}; {r['images_per_s']:.1f} train images/s; "
          f"{r['minutes']:.1f} min; run {r['run_id']} (use: cxr finetune --pretrain-run {r['run_id']})")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["pretrain", *sys.argv[1:]]))
