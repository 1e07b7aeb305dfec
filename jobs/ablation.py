"""``cxr ablation``: repeated fine-tunes over variants and seeds, summarised as the Markdown
tables that docs/RESULTS.md quotes (``cxr.workflows.ablation.run_ablation``)."""

from __future__ import annotations

import sys

from cxr.workflows.ablation import check_variants, run_ablation
from cxr.config import AblationConfig, load_platform
from jobs.runtime import init_ray


def main(cfg: AblationConfig) -> int:
    try:
        check_variants(cfg.variants)
    except ValueError as e:
        print(f"cxr ablation: {e}", file=sys.stderr)
        return 2
    init_ray()
    print(run_ablation(cfg, load_platform()))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["ablation", *sys.argv[1:]]))
