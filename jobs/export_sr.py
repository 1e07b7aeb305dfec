"""``cxr export-sr``: one DICOM SR per scored DICOM study of a job, and a CSV worklist of its
screen-positives (``cxr.workflows.export_sr``). A study that fails is listed in errors.csv and
the others are written. Exit codes: 0 every study written; 1 the scores hold no job (or cannot
be read); 4 some studies failed (the rest written), so a scheduler notices."""

from __future__ import annotations

import sys

from cxr.config import ExportSRConfig, load_platform
from cxr.data.storage import absolute_uri
from cxr.workflows.export_sr import export_sr

EXIT_STUDIES_FAILED = 4


def main(cfg: ExportSRConfig) -> int:
    try:
        platform = load_platform()
        s = export_sr(absolute_uri(cfg.scores), cfg.job, cfg.out, platform.storage, platform.tracking_uri)
    except (ValueError, OSError) as e:
        print(f"cxr export-sr: {e}", file=sys.stderr)
        return 1
    print(f"export-sr: jobs {', '.join(s['jobs'])}: {len(s['reports'])} reports for {s['dicom_images']} scored DICOM images, "
          f"{len(s['errors'])} studies failed (errors.csv); worklist of {s['worklist']} screen-positives; in {s['out']}",
          file=sys.stderr if s["errors"] else sys.stdout)
    return EXIT_STUDIES_FAILED if s["errors"] else 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["export-sr", *sys.argv[1:]]))
