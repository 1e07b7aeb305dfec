"""``cxr retrain``: scheduled retraining as one Ray job (submit it with ``ray job submit -- cxr
retrain`` or the KubeRay RayJob in infra/k8s). It only ever registers a ``challenger``; the
gated promotion decides whether it becomes ``champion`` (``cxr.workflows.retrain``)."""

from __future__ import annotations

import sys

from cxr.config import RetrainConfig, load_platform
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
    print(f"retrain {r['snapshot'][:12]}: " + "; ".join(f"{k}: {v}" for k, v in r["steps"].items())
          + f"; run {r['run_id']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["retrain", *sys.argv[1:]]))
