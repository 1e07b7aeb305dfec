"""``cxr promote``: move ``champion`` to a candidate version only if it passes the gates of
mlflow.yaml on the frozen evaluation set; ``--rollback`` moves it back; the screen's
``champion`` follows the classifier's. Every attempt writes an audit record
(``cxr.promotion.promote``). Exit codes: 0 promoted (or rolled back), 1 rejected or refused
(nothing changed), with the reason in one line."""

from __future__ import annotations

import sys

from cxr.config import PromoteConfig, load_platform
from cxr.promotion import PromotionError, promote


def main(cfg: PromoteConfig) -> int:
    try:
        ok, line = promote(cfg, load_platform())
    except PromotionError as e:
        ok, line = False, f"refused: {e}"
    print(f"cxr promote {cfg.model}: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["promote", *sys.argv[1:]]))
