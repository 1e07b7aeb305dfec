"""``cxr report``: the HTML review page of a scoring run."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr.config import ReportConfig, load_platform
from cxr.data.storage import absolute_uri
from cxr.report import render, select_job
from cxr.scoring import read_scores


def main(cfg: ReportConfig) -> int:
    storage = load_platform().storage
    rows = select_job(read_scores(absolute_uri(cfg.scores), storage).to_pandas(), cfg.job_id)
    if rows.empty:
        print(f"cxr report: no scored rows in {cfg.scores}" + (f" for job {cfg.job_id}" if cfg.job_id else ""),
              file=sys.stderr)
        return 1
    title = f"cxr screening review: {cfg.scores}"
    page = render(rows, title, cfg.top, cfg.max_flagged, cfg.image_size, storage)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"report: {len(rows)} rows -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["report", *sys.argv[1:]]))
