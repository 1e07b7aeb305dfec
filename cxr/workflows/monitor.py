"""Each ``cxr score`` job as a monitored MLflow run: what it scored (counts by status, label,
flag, screen result and why), what it cost (bytes read, images/s), and whether the night drifted
from the reference stored with the model (``cxr.monitoring``). A drifted night, or one whose
error share is above its bound, is an alarm: a line on stderr and exit code 3
(``jobs/score.py``). ``fit_screen_reference`` makes the reference at registration.
``trend`` reads the last nights back for ``cxr report --trend``."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxr import tracking
from cxr.component import Component
from cxr.config import PlatformConfig, ScoreConfig
from cxr.data.storage import StorageConfig, filesystem_for
from cxr.monitoring import (COLUMNS, Comparison, Limits, Reference, answers_table, compare, fit_reference,
                            measure_values)
from cxr.scores_table import SCHEMA, SCORED_STATUSES, scores_dataset

log = logging.getLogger(__name__)

# The columns a night's monitoring reads back from the parts the job wrote.
NIGHT_COLUMNS = [*COLUMNS, "predicted_label", "qc_flags"]
NIGHT_FILE = "monitoring/night.json"


@dataclass
class Night:
    """One job's monitoring: counts, costs, the drift comparisons and the alarms raised."""

    job_id: str
    counts: dict[str, dict[str, int]]
    metrics: dict[str, float]
    comparisons: list[Comparison] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    reference: str = ""          # where the reference came from, or why there is none
    limits: dict = field(default_factory=dict)
    run_id: str | None = None

    @property
    def drifted(self) -> list[str]:
        return [c.measure for c in self.comparisons if c.drifted]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["drifted"] = self.drifted
        return out


def unrecorded(summary: dict, reason: str) -> Night:
    """A night whose monitoring failed after its rows were committed: an alarm, so a scheduler
    sees that nobody judged it (``cxr score`` exits 3), never a traceback over written rows."""
    return Night(summary["job_id"], {}, {}, alarms=[f"the night's monitoring was not recorded ({reason}); its rows "
                                                    "are committed"], reference="not read")


def experiment_name(platform: PlatformConfig, output: str) -> str:
    """One experiment per scores table: its nights side by side."""
    return f"{platform.experiments.get('score', 'cxr-score')}:{output.rstrip('/')}"


def read_night(output: str, parts: list[str], storage: StorageConfig | None) -> pa.Table:
    """The monitored columns of the parts one job wrote (its own files only: the cost follows
    the night, not the table)."""
    if not parts:
        return pa.schema([SCHEMA.field(c) for c in NIGHT_COLUMNS]).empty_table()
    fs, root = filesystem_for(output, storage)
    root = root.rstrip("/")
    return scores_dataset(fs, root, [f"{root}/{p}" for p in parts]).to_table(columns=NIGHT_COLUMNS)


def counts_of(rows: pa.Table, why: dict[str, int]) -> dict[str, dict[str, int]]:
    """The night's counts: by status, predicted label, quality flag, screen result, and why
    scored. Arrow's value counts, never a Python object per row: a night may be the whole
    archive (a new champion rescores it)."""
    def counted(values) -> dict[str, int]:
        return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(values).to_pylist()
                if v["values"] is not None}

    scored = rows.filter(pc.is_in(rows["status"], pa.array(SCORED_STATUSES)))
    positive = scored["screen_positive"]
    screen = {"positive": int(pc.sum(pc.fill_null(positive, False).cast(pa.int64())).as_py() or 0),
              "negative": int(pc.sum(pc.fill_null(pc.invert(positive), False).cast(pa.int64())).as_py() or 0)}
    screen["not screened"] = scored.num_rows - screen["positive"] - screen["negative"]
    flags = pc.list_flatten(rows["qc_flags"]) if rows.num_rows else pa.array([], pa.string())
    return {"status": counted(rows["status"]), "label": counted(rows["predicted_label"]), "flag": counted(flags),
            "screen": {k: v for k, v in screen.items() if v}, "why": dict(why)}


def assess(cfg: ScoreConfig, summary: dict, rows: pa.Table, reference: Reference | None,
           reference_note: str) -> Night:
    """The night's counts, costs, comparisons and alarms (no I/O)."""
    counts = counts_of(rows, summary["why"])
    scored = summary["scored"]
    errors = counts["status"].get("error", 0)
    error_share = errors / scored if scored else 0.0
    metrics = {"inputs": summary["inputs"], "scored": scored, "already_scored": summary["already_scored"],
               "deferred": summary["deferred"], "bytes_read": summary.get("bytes_read", 0),
               "seconds": summary["seconds"], "images_per_s": summary["images_per_s"], "error_share": error_share,
               **{f"{kind}.{key}": value for kind, d in counts.items() for key, value in d.items()}}
    night = Night(summary["job_id"], counts, metrics, reference=reference_note,
                  limits={"psi": cfg.drift_psi, "alpha": cfg.drift_alpha, "min_images": cfg.drift_min_images,
                          "max_error_share": cfg.max_error_share})
    if reference is not None:
        night.comparisons = compare(reference, measure_values(rows), Limits(cfg.drift_psi, cfg.drift_alpha,
                                                                             cfg.drift_min_images))
        for c in night.comparisons:
            if c.psi is not None:
                metrics[f"drift.{c.measure}.psi"] = c.psi
                metrics[f"drift.{c.measure}.p"] = c.p_value
        metrics["drifted_measures"] = len(night.drifted)
    if night.drifted:
        worst = sorted((c for c in night.comparisons if c.drifted), key=lambda c: -c.psi)
        night.alarms.append("drift from the model's reference: " + ", ".join(
            f"{c.measure} PSI {c.psi:.2f} (p {c.p_value:.1g}, {c.n} films)" for c in worst))
    if scored and error_share > cfg.max_error_share:
        night.alarms.append(f"{errors} of {scored} inputs are error rows ({error_share:.0%}, bound "
                            f"{cfg.max_error_share:.0%}): see the error column")
    return night


def record(platform: PlatformConfig, cfg: ScoreConfig, summary: dict, rows: pa.Table) -> Night:
    """Assess the night and log it as a run in the output's experiment. ``rows`` None: its parts
    could not be read back (an alarm)."""
    if rows is None:
        return unrecorded(summary, "its parts could not be read back")
    uri = platform.tracking_uri
    classifier_uri = summary.get("classifier_uri")
    reference, note = None, "no classifier"
    if classifier_uri:
        reference = tracking.load_reference(uri, classifier_uri)
        note = (f"{classifier_uri}: {reference.source}" if reference
                else f"{classifier_uri} carries no reference distributions: drift not measured")
    night = assess(cfg, summary, rows, reference, note)
    if reference is None:
        log.warning("%s", note)
    tags = {"cxr.job": "score", "cxr.job_id": summary["job_id"], "cxr.output": summary["output"],
            "cxr.alarm": "; ".join(night.alarms) or "none"}
    with tracking.tracked_run(uri, experiment_name(platform, summary["output"]), summary["job_id"], tags=tags,
                              artifact_location=platform.artifact_location) as run_id:
        tracking.log_params(uri, run_id, {"classifier": summary["classifier"], "segmenter": summary["segmenter"],
                                          "input": cfg.input, "output": summary["output"],
                                          **{k: v for k, v in asdict(cfg).items() if k not in ("input", "output")}})
        night.run_id = run_id
        tracking.log_metrics(uri, run_id, {metric_name(k): v for k, v in night.metrics.items()})
        tracking.log_dict(uri, run_id, night.to_dict(), NIGHT_FILE)
    return night


def metric_name(key: str) -> str:
    """A label, flag or reason as an MLflow metric name (letters, digits, ``_ - . /`` and spaces);
    the raw names stay in ``night.json``."""
    return re.sub(r"[^\w.\- ]", "_", key).replace("..", "_")


def night_of(tracking_uri: str, platform: PlatformConfig, output: str, job_id: str) -> dict | None:
    """The monitoring record (``Night.to_dict``) of one job, or None if it was not recorded."""
    # A rerun of the same job id that scored nothing must not hide the night that did.
    runs = tracking.search_runs(tracking_uri, experiment_name(platform, output),
                                f"tags.`cxr.job_id` = '{job_id}' and metrics.scored > 0", max_results=1) or \
        tracking.search_runs(tracking_uri, experiment_name(platform, output), f"tags.`cxr.job_id` = '{job_id}'",
                             max_results=1)
    if not runs:
        return None
    try:
        return tracking.load_run_dict(tracking_uri, runs[0].info.run_id, NIGHT_FILE)
    except Exception:       # a run whose artifact was never written (killed while logging)
        return None


def trend(tracking_uri: str, platform: PlatformConfig, output: str, nights: int) -> pd.DataFrame:
    """The last ``nights`` monitored jobs of a table, oldest first: when, how many scored, the
    shares of errors, flags and screen-positives, the largest PSI and the alarm."""
    # Reruns that found nothing new are runs too, but not nights.
    runs = tracking.search_runs(tracking_uri, experiment_name(platform, output),
                                "tags.`cxr.job` = 'score' and metrics.scored > 0", max_results=nights,
                                order_by=["attributes.start_time DESC"])
    records = []
    for run in runs:
        m = run.data.metrics
        scored = m.get("scored", 0.0)
        screened = m.get("screen.positive", 0.0) + m.get("screen.negative", 0.0)
        psis = [v for k, v in m.items() if k.startswith("drift.") and k.endswith(".psi")]
        records.append({
            "job_id": run.data.tags.get("cxr.job_id", run.info.run_name),
            "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc),
            "scored": scored, "images_per_s": m.get("images_per_s", np.nan),
            "error_share": m.get("error_share", np.nan),
            "flagged_share": m.get("status.flagged", 0.0) / scored if scored else np.nan,
            "positive_share": m.get("screen.positive", 0.0) / screened if screened else np.nan,
            "max_psi": max(psis) if psis else np.nan,
            "alarm": run.data.tags.get("cxr.alarm", "none")})
    return pd.DataFrame(records).iloc[::-1].reset_index(drop=True) if records else pd.DataFrame()


def page_section(platform: PlatformConfig, output: str, jobs: list[str], nights: int) -> dict:
    """What the review page shows of monitoring: each of its jobs' records (``Night.to_dict``),
    and with ``nights`` the trend of the table's last nights (a figure and its rows). MLflow
    out of reach leaves a note, not a failed page."""
    section: dict = {"nights": [], "trend": None, "trend_rows": [], "note": ""}
    try:
        for job in jobs:
            record = night_of(platform.tracking_uri, platform, output, job)
            if record is not None:
                section["nights"].append(record)
        if nights:
            frame = trend(platform.tracking_uri, platform, output, nights)
            if not frame.empty:
                from cxr.plots import night_trend

                psi_limit = max((r["limits"].get("psi", 0.25) for r in section["nights"]), default=0.25)
                section["trend"] = night_trend(frame, psi_limit)
                section["trend_rows"] = frame.assign(started=frame["started"].dt.strftime("%Y-%m-%d %H:%M")) \
                    .to_dict(orient="records")
    except Exception as e:      # MLflow's own error types; the rows themselves are still worth a page
        section["note"] = f"monitoring records not read from {platform.tracking_uri}: {str(e).splitlines()[0][:200]}"
    if not section["nights"] and not section["note"]:
        section["note"] = "no monitoring record for these jobs (scored before monitoring, or the run was not logged)"
    return section


def fit_screen_reference(classifier: Component, segmenter: Component | None, uris: list[str],
                         storage: StorageConfig | None, source: str) -> Reference:
    """The screen's answers on ``uris`` (its validation films) through the scoring path
    (``cxr.screen.Screen.predict``), as reference distributions."""
    from cxr.screen import Screen

    frame = Screen(classifier, segmenter).predict(uris, storage=storage, heatmap_size=0)
    reference = fit_reference(measure_values(answers_table(frame)), f"{source} ({len(uris)} films)",
                              datetime.now(timezone.utc).isoformat(timespec="seconds"))
    log.info("reference distributions from %s: %s", source, ", ".join(reference.measures))
    return reference

