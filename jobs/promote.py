"""``cxr promote``: move a screen's ``champion`` to a candidate version only if it passes its
gates (``cxr.gates``, mlflow.yaml); ``--rollback`` restores the recorded state before the last
promotion; ``--unlock`` removes a crashed promotion's lock. Every attempt writes an audit record
(``cxr.workflows.promotion``). Exit codes: 0 promoted (rolled back, unlocked, nothing to do); 1 refused
or aborted, nothing changed; 3 rejected by the gates, nothing changed. One line says why."""

from __future__ import annotations

import logging
import sys

from cxr.config import PromoteConfig, load_platform
from cxr.workflows.promotion import EXIT_FAILED, EXIT_PROMOTED, Outcome, PromotionError, promote

log = logging.getLogger(__name__)


def main(cfg: PromoteConfig) -> int:
    try:
        outcome = promote(cfg, load_platform())
    except PromotionError as e:
        outcome = Outcome(EXIT_FAILED, f"refused: {e}")
    except Exception as e:  # noqa: BLE001 - a registry or storage failure before any change: one line
        log.debug("promotion failed", exc_info=True)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        outcome = Outcome(EXIT_FAILED, f"failed before changing anything: {type(e).__name__}: {first}")
    print(f"cxr promote {cfg.model}: {outcome.line}", file=sys.stdout if outcome.code == EXIT_PROMOTED else sys.stderr)
    return outcome.code


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["promote", *sys.argv[1:]]))
