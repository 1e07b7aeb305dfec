"""``cxr report``: the HTML review page of a scoring run, with its monitoring (each job's drift
and alarms, and the trend of the table's last ``--trend`` nights, from MLflow)."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr.config import ReportConfig, load_platform
from cxr.data.storage import absolute_uri
from cxr.report import read_job, render
from cxr.workflows.monitor import page_section


def main(cfg: ReportConfig) -> int:
    platform = load_platform()
    storage, scores = platform.storage, absolute_uri(cfg.scores)
    rows = read_job(scores, cfg.job_id, cfg.top, cfg.max_flagged, storage)
    if rows.empty:
        print(f"cxr report: no scored rows in {cfg.scores}" + (f" for job {cfg.job_id}" if cfg.job_id else ""),
              file=sys.stderr)
        return 1
    title = f"cxr screening review: {cfg.scores}"
    jobs = ", ".join(sorted(rows["job_id"].unique()))
    if cfg.job_id is None:
        scope = (f"The latest night, {rows['scored_date'].max()}: the current row of each of the {len(rows)} inputs "
                 f"scored that day (jobs {jobs}; a killed run resumed is several jobs).")
    elif cfg.job_id == "all":
        scope = f"Every input's current row: {len(rows)} inputs (jobs {jobs})."
    else:
        scope = f"The {len(rows)} rows of job {cfg.job_id}."
    monitoring = page_section(platform, scores, sorted(rows["job_id"].unique()), cfg.trend)
    page = render(rows, title, cfg.top, cfg.max_flagged, cfg.image_size, storage, scope, monitoring)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"report: {len(rows)} rows -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["report", *sys.argv[1:]]))
