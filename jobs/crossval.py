"""``cxr crossval``: leave-one-archive-out evaluation of training recipes
(``cxr.workflows.crossval.run_crossval``): one table, the worst held-out archive first."""

from __future__ import annotations

import sys

from cxr.config import CrossvalConfig, load_platform
from cxr.crossval import check_recipes
from jobs.runtime import init_ray


def main(cfg: CrossvalConfig) -> int:
    from cxr.workflows.crossval import run_crossval

    try:
        check_recipes(cfg.recipes)
    except ValueError as e:
        print(f"cxr crossval: {e}", file=sys.stderr)
        return 2
    init_ray()
    print(run_crossval(cfg, load_platform()))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["crossval", *sys.argv[1:]]))
