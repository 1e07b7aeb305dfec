"""``cxr promote``: move ``champion`` to a candidate version only if it passes the gates of
mlflow.yaml on the frozen evaluation set; ``--rollback`` moves it back. Every attempt writes an
audit record. Exit codes: 0 promoted (or rolled back), 1 rejected or refused (nothing changed),
with the reason in one line."""

from __future__ import annotations

import sys

from cxr.config import PromoteConfig, load_platform
from cxr.promotion import (PromotionError, PromotionLock, alias_version, audit_record, decide, frozen_rows,
                           model_outputs, move_aliases, write_audit)


def main(cfg: PromoteConfig) -> int:
    try:
        ok, line = run(cfg)
    except PromotionError as e:
        ok, line = False, f"refused: {e}"
    print(f"cxr promote {cfg.model}: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def run(cfg: PromoteConfig) -> tuple[bool, str]:
    platform = load_platform()
    uri, aliases, rules_all = platform.tracking_uri, platform.aliases, platform.promotion
    kinds = {v: k for k, v in platform.registered_models.items()}
    if cfg.model not in kinds:
        raise PromotionError(f"unknown model {cfg.model!r}; choices: {sorted(kinds)}")
    kind = kinds[cfg.model]
    experiment = platform.experiments["promotion"]
    with PromotionLock(uri, cfg.model, float(rules_all.get("lock_ttl_s", 3600)), cfg.user or "cxr"):
        before = {"champion": alias_version(uri, cfg.model, aliases["champion"]),
                  "previous_champion": alias_version(uri, cfg.model, aliases["previous_champion"])}
        if cfg.rollback:
            if not before["previous_champion"]:
                raise PromotionError(f"no {aliases['previous_champion']} to roll back to; nothing changed")
            move_aliases(uri, cfg.model, aliases, before["previous_champion"], before["champion"])
            after = {"champion": before["previous_champion"], "previous_champion": before["champion"]}
            record = audit_record("rollback", cfg.model, None, before, after, cfg.reason or "rollback", cfg.user)
            record["outcome"] = "promoted"
            run_id = write_audit(uri, experiment, record)
            return True, f"rolled back: champion v{before['champion']} -> v{after['champion']} (audit run {run_id})"
        version = cfg.version or alias_version(uri, cfg.model, aliases["challenger"])
        if not version:
            raise PromotionError(f"no --version given and no {aliases['challenger']} alias")
        if version == before["champion"]:
            return True, f"v{version} is already {aliases['champion']}; nothing to do"
        rules = rules_all[kind]
        rows = frozen_rows(rules, platform.storage)
        candidate = model_outputs(uri, f"models:/{cfg.model}/{version}", kind, rows, platform.storage)
        champion = (model_outputs(uri, f"models:/{cfg.model}/{before['champion']}", kind, rows, platform.storage)
                    if before["champion"] else None)
        decision = decide(candidate, champion, rules, int(rules_all.get("n_boot", 1000)), int(rules_all.get("seed", 0)))
        if decision.passed:
            move_aliases(uri, cfg.model, aliases, version, before["champion"])
            after = {"champion": version, "previous_champion": before["champion"] or before["previous_champion"]}
        else:
            after = before
        reason = decision.reason + (f"; {cfg.reason}" if cfg.reason else "")
        record = audit_record("promote", cfg.model, decision, before, after, reason, cfg.user)
        record["outcome"] = "promoted" if decision.passed else "rejected"
        run_id = write_audit(uri, experiment, record)
    if decision.passed:
        was = f"was v{before['champion']}" if before["champion"] else "first champion"
        return True, f"v{version} is now {aliases['champion']} ({was}): {decision.reason} (audit run {run_id})"
    return False, f"v{version} rejected, nothing changed: {decision.reason} (audit run {run_id})"


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["promote", *sys.argv[1:]]))
