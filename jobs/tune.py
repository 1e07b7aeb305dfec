"""``cxr tune``: Optuna, through Ray Tune, over the fine-tuning learning rates, dropout and
weight decay, with ASHA early stopping; resumable; the best configuration is written as a
finetune YAML (``cxr.workflows.tune.run_study``)."""

from __future__ import annotations

import sys

from cxr.config import TuneJobConfig, load_platform
from cxr.tune import METRIC
from cxr.workflows.tune import run_study
from jobs.runtime import init_ray


def main(cfg: TuneJobConfig) -> int:
    init_ray()
    best = run_study(cfg, load_platform())
    print(f"tune: {best['trials']} trials in study {cfg.study_name!r}; best {METRIC} {best['value']:.4f} with "
          f"{best['params']}; wrote {best['out']}; run {best['run_id']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["tune", *sys.argv[1:]]))
