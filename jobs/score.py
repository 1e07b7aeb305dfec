"""``cxr score``: the nightly scoring job. Resolves the registered models (the segmenter a
lung-masked classifier pins), lists the inputs, skips what is already scored, streams the rest
through Ray Data and prints a summary (``cxr.workflows.score``).

Exit codes: 0 done (bad images are rows, not failures); 1 a systemic failure (a model alias
missing, the output not writable, storage unreachable, another job holding the output's
lease), with a one-line reason on stderr.
"""

from __future__ import annotations

import sys

from cxr.config import ScoreConfig, load_platform
from cxr.workflows.score import SystemicFailure, plan_scoring, run_scoring
from jobs.runtime import init_ray


def run(cfg: ScoreConfig) -> dict:
    plan = plan_scoring(cfg, load_platform())     # before Ray: a systemic fault stops the job at once
    if plan.inputs.num_rows:                      # nothing new: Ray is not even started
        try:
            init_ray()
        except BaseException:
            plan.lease.release()
            raise
    return run_scoring(plan)


def main(cfg: ScoreConfig) -> int:
    try:
        summary = run(cfg)
    except SystemicFailure as e:
        print(f"cxr score: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))) or "none"

    later = f", {s['deferred']} left for later runs (--limit)" if s["deferred"] else ""
    return (f"score job {s['job_id']}: {s['inputs']} inputs, {s['scored']} scored ({counts(s['why'])}), "
            f"{s['already_scored']} already scored{later}; "
            f"status: {counts(s['by_status'])}; predicted: {counts(s['by_label'])}; "
            f"COVID screen-positive: {s['screen_positive']}; {s['images_per_s']:.1f} images/s; "
            f"{s['parts']} Parquet parts; models {s['segmenter']} + {s['classifier']}; output {s['output']}")


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["score", *sys.argv[1:]]))
