"""``cxr evaluate``: a registered classifier on any labeled manifest, through its card's
preprocessing and operating point. Metrics with 95% bootstrap intervals, the confusion matrix,
ROC curves and Grad-CAM overlays, as JSON + PNG in ``--out`` and in an MLflow run
(``cxr.workflows.evaluate.evaluate_registered``)."""

from __future__ import annotations

import sys

from cxr.config import EvaluateConfig, load_platform
from cxr.evaluation import summary_line
from cxr.workflows.evaluate import EvaluationInputError, evaluate_registered


def main(cfg: EvaluateConfig) -> int:
    try:
        r = evaluate_registered(cfg, load_platform())
    except EvaluationInputError as e:
        print(f"cxr evaluate: {e}", file=sys.stderr)
        return 2
    print(f"evaluate {r['name']} v{r['version']} on {cfg.manifest}: {summary_line(r['report'])}; "
          f"wrote {r['out']}/metrics.json and plots; run {r['run_id']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
