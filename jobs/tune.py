"""``cxr tune``: Optuna, through Ray Tune, over the fine-tuning learning rates, dropout and
weight decay, with ASHA early stopping; resumable; the best configuration is written as a
finetune YAML (``cxr.workflows.tune.run_study``)."""

from __future__ import annotations

import sys

from cxr.config import TuneJobConfig, load_platform
from cxr.tune import METRIC, StudyMismatch
from cxr.workflows.tune import run_study
from jobs.runtime import init_ray


def main(cfg: TuneJobConfig) -> int:
    init_ray()
    try:
        best = run_study(cfg, load_platform())
    except StudyMismatch as e:
        print(f"cxr tune: refused: {e}", file=sys.stderr)
        return 2
    print(f"tune: study {cfg.study_name!r}: {best['finished_before']} trials finished before, "
          f"{best['interrupted']} interrupted (marked failed, run again), {best['added']} added (sampler seed "
          f"{best['seed']}); best {METRIC} {best['value']:.4f} of {best['trials']} with {best['params']}; "
          f"wrote {best['out']}; run {best['run_id']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["tune", *sys.argv[1:]]))
