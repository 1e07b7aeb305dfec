"""``cxr finetune``: dataset II (4- or 3-class, paper or de-confounded), lung-masked by the
registered segmenter (or not: ``--segmenter none``), from a pretraining run, a weights file or
scratch. Evaluates the test split with bootstrap intervals and registers ``cxr-classifier``
with its model card (``cxr.workflows.classifier.finetune``)."""

from __future__ import annotations

import sys

from cxr.config import FinetuneConfig, load_platform
from cxr.evaluation import summary_line
from cxr.workflows.classifier import check_classifier, finetune
from jobs.runtime import init_ray, run_training


def main(cfg: FinetuneConfig) -> int:
    try:
        check_classifier(cfg)
    except ValueError as e:
        print(f"cxr finetune: {e}", file=sys.stderr)
        return 2
    init_ray()
    r, code = run_training("finetune", lambda: finetune(cfg, load_platform()))
    if r is None:
        return code
    print(f"finetune: test {summary_line(r['report'])}; best epoch {r['best_epoch']}; {r['minutes']:.1f} min; "
          f"run {r['run_id']}" + (f"; registered {r['model_name']} version {r['version']}" if r["version"] else ""))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["finetune", *sys.argv[1:]]))
