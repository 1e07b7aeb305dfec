"""Gated promotion of registered models: evaluate the candidate and the champion on the frozen
evaluation set, check absolute gates on lower confidence bounds and non-inferiority by a paired
bootstrap, and move the aliases under a registry-wide lock.

The lock is a registered model named ``<model>.promotion-lock``: creating a registered model is
atomic in MLflow's backend (a unique name), so of two concurrent promotions exactly one gets it.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from cxr import tracking
from cxr.config import PlatformConfig, PromoteConfig
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import StorageConfig, absolute_uri
from cxr.metrics import bootstrap_metrics, classification_metrics, dice_summary, mean_interval

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """Promotion cannot proceed (lock held, frozen set changed, nothing to roll back to)."""


@dataclass
class Outputs:
    """What a model produced on the evaluation set: enough to recompute any metric on a resample."""

    kind: str                                   # classifier | segmenter
    y: np.ndarray | None = None                 # classifier: true class indices
    probs: np.ndarray | None = None             # classifier: (N, C) probabilities
    classes: list[str] = field(default_factory=list)
    dice: np.ndarray | None = None              # segmenter: per-image Dice

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        if self.kind == "segmenter":
            values = self.dice if idx is None else self.dice[idx]
            return float(dice_summary(pd.Series(values))[name.removeprefix("dice_")])
        y, p = (self.y, self.probs) if idx is None else (self.y[idx], self.probs[idx])
        return classification_metrics(y, p, self.classes)[name]

    def with_intervals(self, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
        if self.kind == "classifier":
            return bootstrap_metrics(self.y, self.probs, self.classes, n_boot, seed)
        low, high = mean_interval(self.dice, n_boot, seed)
        return {"dice_mean": {"value": float(self.dice.mean()), "low": low, "high": high}}


def paired_difference(candidate: Outputs, champion: Outputs, metric: str, n_boot: int, seed: int) -> dict[str, float]:
    """candidate - champion on the same resamples of the same images, with its 95% interval."""
    rng = np.random.default_rng(seed)
    n = len(candidate.y) if candidate.kind == "classifier" else len(candidate.dice)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        draws.append(candidate.metric(metric, idx) - champion.metric(metric, idx))
    draws = np.array(draws, dtype=float)
    return {"value": candidate.metric(metric) - champion.metric(metric),
            "low": float(np.nanpercentile(draws, 2.5)), "high": float(np.nanpercentile(draws, 97.5))}


@dataclass
class Decision:
    passed: bool
    reason: str
    candidate_metrics: dict
    champion_metrics: dict | None
    gates: list[dict]
    non_inferiority: dict | None


def decide(candidate: Outputs, champion: Outputs | None, rules: dict, n_boot: int, seed: int) -> Decision:
    """Apply the absolute gates (lower bound >= threshold) and, with a champion, non-inferiority."""
    cand = candidate.with_intervals(n_boot, seed)
    gates, failures = [], []
    for name, threshold in (rules.get("gates") or {}).items():
        if name not in cand:
            raise PromotionError(f"unknown gate metric {name!r}; choices: {sorted(cand)}")
        low = cand[name]["low"]
        ok = bool(np.isfinite(low) and low >= threshold)
        gates.append({"metric": name, "threshold": threshold, **cand[name], "passed": ok})
        if not ok:
            failures.append(f"{name} lower bound {low:.3f} < {threshold}")
    champ, ni = None, None
    if champion is not None and rules.get("non_inferiority"):
        champ = champion.with_intervals(n_boot, seed)
        metric, margin = rules["non_inferiority"]["metric"], float(rules["non_inferiority"]["margin"])
        ni = {"metric": metric, "margin": margin, **paired_difference(candidate, champion, metric, n_boot, seed)}
        ni["passed"] = bool(ni["low"] >= -margin)
        if not ni["passed"]:
            failures.append(f"{metric} may be worse than the champion's by more than {margin} "
                            f"(candidate - champion {ni['value']:+.3f}, 95% CI [{ni['low']:+.3f}, {ni['high']:+.3f}])")
    reason = "; ".join(failures) if failures else (
        "all gates hold" + (f"; not worse than the champion by more than {ni['margin']}" if ni else "; no champion yet"))
    return Decision(not failures, reason, cand, champ, gates, ni)


# --- evaluating on the frozen set ----------------------------------------------------------------

def frozen_rows(rules: dict, storage: StorageConfig | None) -> pd.DataFrame:
    """The evaluation rows; refuses if their digest is not the one frozen in mlflow.yaml."""
    manifest = read_manifest(absolute_uri(rules["evaluation_manifest"]), storage)
    rows = manifest[manifest["split"] == rules["evaluation_split"]] if rules.get("evaluation_split") else manifest
    digest = manifest_digest(rows)
    if digest != rules["evaluation_sha256"]:
        raise PromotionError(f"the frozen evaluation set changed: {rules['evaluation_manifest']} "
                             f"({rules.get('evaluation_split')}) has digest {digest[:12]}, mlflow.yaml freezes "
                             f"{rules['evaluation_sha256'][:12]}")
    return rows.reset_index(drop=True)


def model_outputs(tracking_uri: str, model_uri: str, kind: str, rows: pd.DataFrame,
                  storage: StorageConfig | None) -> Outputs:
    """Run a registered model on the evaluation rows."""
    from cxr.classification import predict
    from cxr.evaluation import card_inputs
    from cxr.segmentation import evaluate_segmenter

    loaded = tracking.load_registered(tracking_uri, model_uri)
    model, card = loaded.model, loaded.card
    if kind == "segmenter":
        per_image, _ = evaluate_segmenter(model, rows, card.preprocessing.letterbox_size, storage)
        return Outputs("segmenter", dice=per_image["dice"].to_numpy())
    classes = list(card.labels)
    images = card_inputs(tracking_uri, card, rows, storage, threads=4)
    probs, _ = predict(model, images)
    y = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    if np.isnan(y.astype(float)).any():
        raise PromotionError(f"{model_uri}: the evaluation labels {sorted(set(rows['label']))} are not its {classes}")
    return Outputs("classifier", y=y.astype(np.int64), probs=probs, classes=classes)


# --- the lock and the aliases ----------------------------------------------------------------------

class PromotionLock:
    """Exclusive promotion rights on one registered model, held as a registered model."""

    def __init__(self, tracking_uri: str, model: str, ttl_s: float, owner: str):
        self.uri, self.name, self.ttl_s, self.owner = tracking_uri, f"{model}.promotion-lock", ttl_s, owner

    def __enter__(self) -> "PromotionLock":
        from mlflow.exceptions import MlflowException

        c = tracking.client(self.uri)
        for attempt in range(2):
            try:
                c.create_registered_model(self.name, description=json.dumps(
                    {"owner": self.owner, "since": time.time()}))
                return self
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                    raise
                held = json.loads(c.get_registered_model(self.name).description or "{}")
                age = time.time() - float(held.get("since", 0))
                if attempt == 0 and age > self.ttl_s:
                    log.warning("breaking a stale promotion lock held by %s for %.0f s", held.get("owner"), age)
                    c.delete_registered_model(self.name)
                    continue
                raise PromotionError(f"another promotion of {self.name.removesuffix('.promotion-lock')} is in "
                                     f"progress (lock held by {held.get('owner')} for {age:.0f} s); nothing changed")
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        tracking.client(self.uri).delete_registered_model(self.name)


def alias_version(tracking_uri: str, model: str, alias: str) -> str | None:
    try:
        return str(tracking.client(tracking_uri).get_model_version_by_alias(model, alias).version)
    except Exception:  # MLflow raises for a missing alias
        return None


def audit_record(action: str, model: str, decision: Decision | None, before: dict, after: dict,
                 reason: str, user: str | None = None) -> dict:
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "user": user or getpass.getuser(),
            "action": action, "model": model, "before": before, "after": after, "reason": reason,
            "decision": asdict(decision) if decision else None}


def write_audit(tracking_uri: str, experiment: str, record: dict) -> str:
    """One MLflow run per promotion attempt (tag ``cxr.audit``), with ``audit.json`` and the
    model's whole ``history.json``; the registry gets ``last_promotion`` and version tags."""
    c = tracking.client(tracking_uri)
    run_id = tracking.start_run(tracking_uri, experiment, f"{record['action']}-{record['model']}",
                                tags={"cxr.model": record["model"], "cxr.action": record["action"],
                                      "cxr.outcome": record["outcome"],
                                      "cxr.audit": json.dumps({k: v for k, v in record.items() if k != "decision"})[:5000]})
    exp = c.get_experiment_by_name(experiment)
    earlier = c.search_runs([exp.experiment_id], f"tags.`cxr.model` = '{record['model']}'", order_by=["start_time ASC"])
    history = [json.loads(r.data.tags["cxr.audit"]) for r in earlier if "cxr.audit" in r.data.tags]
    tracking.log_dict(tracking_uri, run_id, record, "audit.json")
    tracking.log_dict(tracking_uri, run_id, history, "history.json")
    tracking.end_run(tracking_uri, run_id)
    if record["outcome"] == "promoted":
        c.set_registered_model_tag(record["model"], "last_promotion", json.dumps(
            {k: record[k] for k in ("time", "user", "action", "before", "after", "reason")})[:5000])
        version = record["after"]["champion"]
        for k, v in {"promoted_at": record["time"], "promoted_by": record["user"], "promotion_run_id": run_id,
                     "promotion_reason": record["reason"][:4000]}.items():
            c.set_model_version_tag(record["model"], version, k, v)
    return run_id


def move_aliases(tracking_uri: str, model: str, aliases: dict, champion: str, previous: str | None) -> None:
    """champion -> ``champion``; the old one -> ``previous-champion`` (set first, so a crash in
    between leaves the old champion reachable under both names, never neither)."""
    c = tracking.client(tracking_uri)
    if previous:
        c.set_registered_model_alias(model, aliases["previous_champion"], previous)
    c.set_registered_model_alias(model, aliases["champion"], champion)



# --- the workflow ------------------------------------------------------------------------------------

def promote(cfg: PromoteConfig, platform: PlatformConfig) -> tuple[bool, str]:
    """Gated promotion (or ``cfg.rollback``) of one registered model under the lock, with an
    audit record. When the classifier's ``champion`` moves, ``cxr-screen@champion`` follows
    (the screen of that classifier, registered if needed). Returns (changed or nothing to do, one line)."""
    uri, aliases, rules_all = platform.tracking_uri, platform.aliases, platform.promotion
    kinds = {v: k for k, v in platform.registered_models.items() if k in ("classifier", "segmenter")}
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
            screen = _follow(platform, kind, after["champion"])
            return True, (f"rolled back: champion v{before['champion']} -> v{after['champion']}{screen} "
                          f"(audit run {run_id})")
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
        screen = _follow(platform, kind, version)
        return True, f"v{version} is now {aliases['champion']} ({was}){screen}: {decision.reason} (audit run {run_id})"
    return False, f"v{version} rejected, nothing changed: {decision.reason} (audit run {run_id})"


def _follow(platform: PlatformConfig, kind: str, classifier_version: str) -> str:
    """The screen alias follows the classifier's champion; a segmenter's champion changes no
    screen (a lung-masked classifier pins its own segmenter version)."""
    if kind != "classifier" or "screen" not in platform.registered_models:
        return ""
    from cxr.workflows.screen import screen_for_classifier

    alias = platform.aliases["champion"]
    version = screen_for_classifier(platform, classifier_version, alias)
    return f"; {platform.registered_models['screen']}@{alias} is v{version}"
