"""``cxr retrain``: scheduled retraining as one Ray job (submit it with ``ray job submit -- cxr
retrain`` or the KubeRay RayJob in infra/k8s). It only ever registers a ``challenger``; the
gated promotion decides whether it becomes ``champion`` (``cxr.workflows.retrain``).

Exit codes, for schedulers: 0 retrained and promoted, or this snapshot (data and settings) was
retrained before; 1 the retraining could not run, or its promotion was refused or aborted (lock
held, registry error); 3 retrained, and the gates rejected the new model (nothing promoted)."""

from __future__ import annotations

import sys

from cxr.config import RetrainConfig, load_platform
from cxr.workflows.promotion import EXIT_FAILED, EXIT_PROMOTED, EXIT_REJECTED
from cxr.workflows.retrain import RetrainError, retrain
from jobs.runtime import init_ray


def main(cfg: RetrainConfig) -> int:
    try:
        r = retrain(cfg, load_platform(), init_ray)
    except RetrainError as e:
        print(f"cxr retrain: {e}", file=sys.stderr)
        return 1
    if "done_by" in r:
        print(f"retrain: snapshot {r['snapshot'][:12]} was retrained by run {r['done_by']}; nothing new")
        return 0
    print(f"retrain {r['snapshot'][:12]}: " + "; ".join(
        f"{k}: {({n: v for n, v in step.items() if n != 'promotion_code'})}" for k, step in r["steps"].items())
          + f"; run {r['run_id']}")
    codes = [step["promotion_code"] for step in r["steps"].values() if "promotion_code" in step]
    # A refusal (lock held, registry error) outranks a rejection: it needs a person, a rejection a better model.
    return EXIT_FAILED if EXIT_FAILED in codes else EXIT_REJECTED if EXIT_REJECTED in codes else EXIT_PROMOTED


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["retrain", *sys.argv[1:]]))
