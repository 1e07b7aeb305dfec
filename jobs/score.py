"""``cxr score``: the nightly scoring job. Resolves the registered models (the segmenter a
lung-masked classifier pins), lists the inputs, skips what is already scored, streams the rest
through Ray Data and prints a summary (``cxr.workflows.score``). Each job is an MLflow run in the
output's experiment, with its counts, costs and drift from the model's reference
(``cxr.workflows.monitor``, docs/MONITORING.md).

Exit codes, for schedulers: 0 done (bad images are rows, not failures); 1 a systemic failure
(a model alias missing, the output not writable, storage unreachable, another job holding the
output's lease), with a one-line reason on stderr; 3 done, every row written, but the night
raised an alarm: it drifted from the model's reference (``--drift-psi``, ``--drift-alpha``) or
its error share is above ``--max-error-share``, with one line per alarm on stderr.
"""

from __future__ import annotations

import sys

from cxr.config import ScoreConfig, load_platform
from cxr.workflows import monitor
from cxr.workflows.score import SystemicFailure, plan_scoring, run_scoring
from jobs.runtime import init_ray

ALARM = 3      # done, but the night drifted or its error share is above its bound


def run(cfg: ScoreConfig) -> dict:
    """Score, then record the night as a monitored MLflow run (``summary["monitoring"]``)."""
    platform = load_platform()
    plan = plan_scoring(cfg, platform)     # before Ray: a systemic fault stops the job at once
    if plan.inputs.num_rows:                      # nothing new: Ray is not even started
        try:
            init_ray()
        except BaseException:
            plan.lease.release()
            raise
    summary = run_scoring(plan)
    night = summary.pop("night")
    try:
        summary["monitoring"] = monitor.record(platform, cfg, summary, night)
    except Exception as e:  # MLflow's, Arrow's or a bad reference's: the rows are committed all the same
        summary["monitoring"] = monitor.unrecorded(summary, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                                                   if str(e).strip() else type(e).__name__)
    return summary


def main(cfg: ScoreConfig) -> int:
    try:
        summary = run(cfg)
    except SystemicFailure as e:
        print(f"cxr score: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    night = summary["monitoring"]
    for alarm in night.alarms:
        print(f"cxr score: ALARM: {alarm}", file=sys.stderr)
    return ALARM if night.alarms else 0


def format_summary(s: dict) -> str:
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))) or "none"

    later = f", {s['deferred']} left for later runs (--limit)" if s["deferred"] else ""
    return (f"score job {s['job_id']}: {s['inputs']} inputs, {s['scored']} scored ({counts(s['why'])}), "
            f"{s['already_scored']} already scored{later}; "
            f"status: {counts(s['by_status'])}; predicted: {counts(s['by_label'])}; "
            f"COVID screen-positive: {s['screen_positive']}; {s['images_per_s']:.1f} images/s; "
            f"{s['parts']} Parquet parts; models {s['segmenter']} + {s['classifier']}; output {s['output']}"
            + (f"; {_drift_line(s['monitoring'])}" if "monitoring" in s else ""))


def _drift_line(night) -> str:
    judged = [c for c in night.comparisons if c.psi is not None]
    if night.reference == "not read":
        return "monitoring not recorded"
    if not night.comparisons:
        return "drift not measured (no reference with the model)"
    if not judged:
        return f"drift not judged ({night.comparisons[0].note})"
    worst = max(judged, key=lambda c: c.psi)
    return (f"drift: {len(night.drifted)} of {len(judged)} measures drifted (largest PSI {worst.psi:.2f}, "
            f"{worst.measure}); MLflow run {night.run_id}")


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["score", *sys.argv[1:]]))
