"""Gated, atomic, reversible promotion of registered models.

The unit of promotion is the screen (``cxr-screen``: segmenter, classifier, preprocessing,
operating point and QC in one registered version); promoting a classifier version promotes its
screen. A screen is judged on its gate set (``cxr.gates``), a segmenter by Dice on the frozen
set of mlflow.yaml; with a champion, the candidate must also not be worse (paired bootstrap).

One promotion is one transaction on the registry: its audit run is opened, the aliases
(``champion``, ``previous-champion``) and tags are written, and the audit run is committed by
its ``cxr.outcome`` tag, last. A failure at any step undoes the steps before it, so the registry
is as it was and the audit says the attempt aborted. ``--rollback`` restores the state recorded
before the last promotion not yet rolled back (a stack replayed from the committed audit runs),
so a second rollback goes further back, never toggles.

The lock is a registered model named ``<model>.promotion-lock``: creating a registered model is
atomic in MLflow's backend (a unique name), so of two concurrent promotions exactly one gets it.
Its holder rewrites a heartbeat into it every ``lock_ttl_s / 3``; a lock without a heartbeat for
``lock_ttl_s`` is stale and is broken by the next promotion; ``cxr promote --unlock`` removes it
(audited).
"""

from __future__ import annotations

import getpass
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from cxr import tracking
from cxr.config import PlatformConfig, PromoteConfig
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.data.storage import StorageConfig, absolute_uri
from cxr.metrics import dice_summary, mean_interval

log = logging.getLogger(__name__)


# Exit codes of cxr promote (and of cxr retrain's promotion step), for schedulers.
EXIT_PROMOTED = 0        # promoted, rolled back, unlocked, or nothing to do
EXIT_FAILED = 1          # could not run or aborted (lock held, registry error): nothing changed
EXIT_REJECTED = 3        # the candidate failed its gates: nothing changed


class PromotionError(RuntimeError):
    """Promotion cannot proceed (lock held, frozen set changed, nothing to roll back to)."""


class PromotionAborted(PromotionError):
    """A registry call failed half-way; the steps before it were undone."""


@dataclass
class Outputs:
    """A segmenter's per-image Dice on the frozen set: enough to recompute its mean on a resample."""

    dice: np.ndarray

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        values = self.dice if idx is None else self.dice[idx]
        return float(dice_summary(pd.Series(values))[name.removeprefix("dice_")])

    def with_intervals(self, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
        low, high = mean_interval(self.dice, n_boot, seed)
        return {"dice_mean": {"value": float(self.dice.mean()), "low": low, "high": high}}


def paired_difference(candidate: Outputs, champion: Outputs, metric: str, n_boot: int, seed: int) -> dict[str, float]:
    """candidate - champion on the same resamples of the same images, with its 95% interval."""
    rng = np.random.default_rng(seed)
    n = len(candidate.dice)
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


def segmenter_outputs(tracking_uri: str, model_uri: str, rows: pd.DataFrame, storage: StorageConfig | None) -> Outputs:
    """Run a registered segmenter on the frozen rows."""
    from cxr.segmentation import evaluate_segmenter

    loaded = tracking.load_registered(tracking_uri, model_uri)
    per_image, _ = evaluate_segmenter(loaded.model, rows, loaded.card.preprocessing.letterbox_size, storage)
    return Outputs(per_image["dice"].to_numpy())


# --- the lock ----------------------------------------------------------------------------------------

class PromotionLock:
    """Exclusive promotion rights on one registered model, held as a registered model whose
    description carries the holder and its heartbeat."""

    def __init__(self, tracking_uri: str, model: str, ttl_s: float, owner: str):
        self.uri, self.name, self.ttl_s, self.owner = tracking_uri, lock_name(model), float(ttl_s), owner
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps({"owner": self.owner, "token": self.token, "heartbeat": time.time()})

    def _held(self) -> dict | None:
        return lock_holder(self.uri, self.name.removesuffix(LOCK_SUFFIX))

    def ours(self) -> bool:
        """Whether the lock is still this promotion's (not broken as stale, nor --unlock'ed)."""
        held = self._held()
        return bool(held) and held.get("token") == self.token

    def __enter__(self) -> "PromotionLock":
        from mlflow.exceptions import MlflowException

        c = tracking.client(self.uri)
        for attempt in range(2):
            try:
                c.create_registered_model(self.name, description=self._record())
                break
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                    raise PromotionError(f"could not take the promotion lock ({_first_line(e)}); nothing changed") from e
                held = self._held() or {}
                if held.get("token") == self.token:     # our create went through; its reply was lost
                    break
                age = time.time() - float(held.get("heartbeat", held.get("since", 0)))
                if attempt == 0 and age > self.ttl_s:
                    log.warning("breaking a stale promotion lock of %s (no heartbeat for %.0f s)", held.get("owner"), age)
                    try:
                        c.delete_registered_model(self.name)
                    except MlflowException as gone:       # another promotion broke it first
                        if "RESOURCE_DOES_NOT_EXIST" not in str(gone.error_code):
                            raise PromotionError(f"could not break the stale promotion lock ({_first_line(gone)}); "
                                                 "nothing changed") from gone
                    continue
                raise PromotionError(f"another promotion of {self.name.removesuffix(LOCK_SUFFIX)} is in progress "
                                     f"(lock held by {held.get('owner')}, last heartbeat {age:.0f} s ago; it expires "
                                     f"after {self.ttl_s:.0f} s without one, or: cxr promote --unlock); nothing changed")
        self._thread = threading.Thread(target=self._heartbeat, name="cxr-promotion-lock", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Before changing the registry: refuse if the lock is no longer ours."""
        if not self.ours():
            raise PromotionError(f"the promotion lock was taken over ({self._held()}); nothing changed")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.ours():         # broken as stale, or --unlock'ed: never rewrite another's lock
                    log.error("the promotion lock %s is no longer this promotion's", self.name)
                    return
                tracking.client(self.uri).update_registered_model(self.name, description=self._record())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lock expires if all fail
                log.warning("promotion lock heartbeat failed: %s", _first_line(e))

    def __exit__(self, *exc) -> None:
        """Released on every exit path (only if still ours); a lock that cannot be deleted
        expires ``ttl_s`` after its last heartbeat."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        for attempt in range(3):
            try:
                if self.ours():
                    tracking.client(self.uri).delete_registered_model(self.name)
                return
            except Exception as e:  # noqa: BLE001 - never hides why the promotion ended
                if attempt == 2:
                    log.warning("could not release the promotion lock %s (it expires in %.0f s): %s", self.name,
                                self.ttl_s, _first_line(e))
                else:
                    time.sleep(0.5)


LOCK_SUFFIX = ".promotion-lock"


def lock_name(model: str) -> str:
    return f"{model}{LOCK_SUFFIX}"


def lock_holder(tracking_uri: str, model: str) -> dict | None:
    """The lock's record (owner, heartbeat), or None if no promotion holds it."""
    from mlflow.exceptions import MlflowException

    try:
        description = tracking.client(tracking_uri).get_registered_model(lock_name(model)).description
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return None
        raise
    try:
        held = json.loads(description or "{}")
    except ValueError:
        held = {}
    return held if isinstance(held, dict) else {}


# --- aliases, the audit trail, and one transaction -------------------------------------------------

def alias_version(tracking_uri: str, model: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.client(tracking_uri).get_model_version_by_alias(model, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def aliases_now(tracking_uri: str, model: str, aliases: dict) -> dict:
    return {"champion": alias_version(tracking_uri, model, aliases["champion"]),
            "previous_champion": alias_version(tracking_uri, model, aliases["previous_champion"])}


def history(tracking_uri: str, experiment: str, model: str) -> list[dict]:
    """The committed audit records of ``model`` (promotions and rollbacks that took effect), oldest first."""
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`cxr.model` = '{model}' and tags.`cxr.outcome` = 'promoted'",
                         order_by=["attributes.start_time ASC"], max_results=10000)
    return [json.loads(r.data.tags["cxr.audit"]) for r in runs if "cxr.audit" in r.data.tags]


def restore_stack(records: list[dict]) -> list[dict]:
    """The states a rollback can restore, newest last: each promotion pushes the state before
    it, each rollback pops one. So rollbacks walk back through promotions, never toggle."""
    stack: list[dict] = []
    for r in records:
        if r["action"] == "promote":
            stack.append(r["before"])
        elif r["action"] == "rollback" and stack:
            stack.pop()
    return stack


def audit_record(action: str, model: str, decision: Decision | dict | None, before: dict, after: dict,
                 reason: str, user: str | None = None) -> dict:
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "user": user or getpass.getuser(),
            "action": action, "model": model, "before": before, "after": after, "reason": reason,
            "decision": asdict(decision) if isinstance(decision, Decision) else decision}


def audit_summary(record: dict) -> dict:
    """What the ``cxr.audit`` tag holds (history and rollback read it): always valid JSON within
    MLflow's tag limit; the whole record, decision included, is the run's ``audit.json``."""
    keep = {k: record.get(k) for k in ("time", "user", "action", "model", "before", "after")}
    return {**keep, "reason": str(record.get("reason", ""))[:1000]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def commit(platform: PlatformConfig, record: dict) -> str:
    """Apply ``record`` (its ``after`` aliases, its version tags) and write its audit run, as
    one transaction: the audit run's ``cxr.outcome`` is set to ``promoted`` last, and a failure
    before that undoes every step done (aliases back to ``before``), marks the run aborted and
    raises ``PromotionAborted``. Returns the audit run id."""
    uri, aliases, model = platform.tracking_uri, platform.aliases, record["model"]
    c = tracking.client(uri)
    summary = audit_summary(record)
    try:
        run_id = tracking.start_run(uri, platform.experiments["promotion"], f"{record['action']}-{model}",
                                    tags={"cxr.model": model, "cxr.action": record["action"], "cxr.outcome": "pending",
                                          "cxr.audit": json.dumps(summary)})
    except Exception as e:  # noqa: BLE001 - nothing was changed yet
        raise PromotionAborted(f"could not open the audit run ({_first_line(e)}); nothing changed") from e
    undo: list = []

    def step(do, undo_step=None) -> None:
        # The undo is recorded first: a call that reached the server but lost its reply is undone too
        # (every undo sets a value back, so undoing what did not happen is harmless).
        if undo_step is not None:
            undo.append(undo_step)
        do()

    def set_alias(alias: str, version: str | None) -> None:
        _set_alias(c, uri, model, alias, version)

    before, after = record["before"], record["after"]
    try:
        step(lambda: tracking.log_dict(uri, run_id, record, "audit.json"))
        # previous-champion first: a crash in between leaves the old champion reachable.
        for key in ("previous_champion", "champion"):
            if after[key] != before[key]:
                step(lambda k=key: set_alias(aliases[k], after[k]), lambda k=key: set_alias(aliases[k], before[k]))
        for name, key, was, now in mirrored(platform, record):
            step(lambda n=name, k=key, v=now: _set_alias(c, uri, n, aliases[k], v),
                 lambda n=name, k=key, v=was: _set_alias(c, uri, n, aliases[k], v))
        if record["action"] == "promote" and after["champion"]:
            tags = {"promoted_at": record["time"], "promoted_by": record["user"], "promotion_run_id": run_id,
                    "promotion_reason": record["reason"][:4000]}
            old = c.get_model_version(model, after["champion"]).tags
            for k, v in tags.items():
                step(lambda k=k, v=v: c.set_model_version_tag(model, after["champion"], k, v),
                     lambda k=k: (c.set_model_version_tag(model, after["champion"], k, old[k]) if k in old
                                  else c.delete_model_version_tag(model, after["champion"], k)))
        step(lambda: c.set_terminated(run_id, "FINISHED"))
        step(lambda: c.set_tag(run_id, "cxr.outcome", "promoted"))     # the commit
    except Exception as e:  # noqa: BLE001 - undone below, reported in one line
        failed = []
        for undo_step in reversed(undo):
            try:
                undo_step()
            except Exception as again:  # noqa: BLE001
                failed.append(_first_line(again))
        try:
            c.set_tag(run_id, "cxr.outcome", "aborted")
            c.set_tag(run_id, "cxr.abort_reason", _first_line(e))
            c.set_terminated(run_id, "FAILED")
        except Exception as again:  # noqa: BLE001
            failed.append(_first_line(again))
        state = (f"the registry is as it was (champion v{before['champion']})" if not failed else
                 f"undoing it failed too ({failed[0]}): check {model}'s aliases against audit run {run_id}")
        raise PromotionAborted(f"{record['action']} aborted: a registry call failed ({_first_line(e)}); {state}") from e
    return run_id


def _set_alias(c, uri: str, model: str, alias: str, version: str | None) -> None:
    """Point ``alias`` at ``version``; None removes it."""
    if version:
        c.set_registered_model_alias(model, alias, version)
    elif alias_version(uri, model, alias):
        c.delete_registered_model_alias(model, alias)


def recover_pending(platform: PlatformConfig, model: str) -> str:
    """A promotion killed in its transaction (kill -9, a lost pod) leaves its audit run
    ``pending``: under the lock, put the aliases back to that run's ``before`` and mark it
    aborted, so the next promotion starts from a recorded state. Returns a note, or ""."""
    uri, aliases = platform.tracking_uri, platform.aliases
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(platform.experiments["promotion"])
    if exp is None:
        return ""
    pending = c.search_runs([exp.experiment_id], f"tags.`cxr.model` = '{model}' and tags.`cxr.outcome` = 'pending'")
    notes = []
    for run in pending:
        record = json.loads(run.data.tags["cxr.audit"])
        for key in ("previous_champion", "champion"):
            _set_alias(c, uri, model, aliases[key], record["before"][key])
            if model == platform.registered_models.get("screen", "cxr-screen"):
                _set_alias(c, uri, platform.registered_models["classifier"], aliases[key],
                           classifier_of(platform, model, record["before"][key]))
        c.set_tag(run.info.run_id, "cxr.outcome", "aborted")
        c.set_tag(run.info.run_id, "cxr.abort_reason", "interrupted; undone by the next promotion")
        c.set_terminated(run.info.run_id, "KILLED")
        notes.append(run.info.run_id)
    return f"undid the interrupted {', '.join(notes)}; " if notes else ""


def classifier_of(platform: PlatformConfig, screen: str, version: str | None) -> str | None:
    """The ``cxr-classifier`` version a screen version was built from (None: none, or not ours)."""
    if not version:
        return None
    tag = tracking.client(platform.tracking_uri).get_model_version(screen, version).tags.get("cxr.classifier")
    return tag.rsplit("/", 1)[1] if tag and tag.rsplit("/", 1)[0] == platform.registered_models["classifier"] else None


def mirrored(platform: PlatformConfig, record: dict) -> list[tuple[str, str, str | None, str | None]]:
    """(classifier model, alias key, version before, version after) for each alias of a screen
    that moves: ``cxr-classifier@champion`` names the classifier of ``cxr-screen@champion``
    (for the tools that take a classifier), moved in the same transaction."""
    names = platform.registered_models
    if record["model"] != names.get("screen", "cxr-screen"):
        return []
    moves = []
    for key in ("previous_champion", "champion"):
        # The undo restores what the alias is now (it may differ from the old screen's classifier).
        was = alias_version(platform.tracking_uri, names["classifier"], platform.aliases[key])
        now = classifier_of(platform, record["model"], record["after"][key])
        if was != now:
            moves.append((names["classifier"], key, was, now))
    return moves


def record_refusal(platform: PlatformConfig, record: dict) -> str | None:
    """An audit run for an attempt the gates refused (nothing to undo); None if it cannot be written."""
    uri = platform.tracking_uri
    try:
        with tracking.tracked_run(uri, platform.experiments["promotion"], f"{record['action']}-{record['model']}",
                                  tags={"cxr.model": record["model"], "cxr.action": record["action"],
                                        "cxr.outcome": record["outcome"],
                                        "cxr.audit": json.dumps(audit_summary(record))}) as run_id:
            tracking.log_dict(uri, run_id, record, "audit.json")
        return run_id
    except Exception as e:  # noqa: BLE001 - the refusal stands; its record is best effort
        log.warning("could not write the audit record of the refusal: %s", _first_line(e))
        return None


# --- judging a candidate ----------------------------------------------------------------------------

def screen_rules(platform: PlatformConfig) -> dict:
    rules = dict(platform.promotion.get("screen") or {})
    if not rules.get("gates"):
        raise PromotionError("mlflow.yaml has no promotion.screen.gates")
    return {**rules, "n_boot": platform.promotion.get("n_boot", 1000), "seed": platform.promotion.get("seed", 0)}


def judge_screen(platform: PlatformConfig, candidate_uri: str, champion_uri: str | None) -> tuple[Decision, dict]:
    """The candidate screen on its gate set (and the champion on the same films)."""
    from cxr.data.manifest import read_manifest
    from cxr.gates import GateScoringError, GateSetError, TrainingSet, assess, judge, learnt_from, paired_difference
    from cxr.workflows.screen import load

    rules = screen_rules(platform)
    manifest = absolute_uri(rules["gate_manifest"])
    try:
        archives = read_manifest(manifest, platform.storage)
    except (OSError, ValueError) as e:
        raise PromotionError(f"no gate set: {rules['gate_manifest']} cannot be read ({_first_line(e)}); "
                             "run cxr prepare-data") from e
    try:
        candidate = assess(load(candidate_uri, platform.tracking_uri, "cpu", storage=platform.storage),
                           archives, rules, platform.storage)
    except GateSetError as e:
        decision = Decision(False, f"{candidate_uri}: {e}", {}, None, [], None)
        return decision, {}
    except GateScoringError as e:
        raise PromotionError(f"the gate set could not be scored ({e}); nothing changed") from e
    difference, champion_figures = None, None
    if champion_uri:      # (with no film neither learnt from, there is nothing to compare on)
        champion_screen = load(champion_uri, platform.tracking_uri, "cpu", storage=platform.storage)
        gate = candidate.outcomes.drop(columns=["flagged", "screened", "covid_probability"])
        try:
            # Compared on the films neither learnt from, so the champion is not judged on its training data.
            neither = ~learnt_from(gate, TrainingSet.of(champion_screen.classifier.card)).to_numpy()
        except GateSetError:
            neither = np.ones(len(gate), bool)
            log.warning("%s does not record what it learnt from: compared on the candidate's gate set", champion_uri)
        if not neither.any():
            log.warning("%s learnt from every film of the gate set: no comparison with it", champion_uri)
            neither = None
    if champion_uri and neither is not None:
        try:
            champion = assess(champion_screen, archives, rules, platform.storage, gate=gate[neither].reset_index(drop=True))
        except GateScoringError as e:
            raise PromotionError(f"the gate set could not be scored by the champion ({e}); nothing changed") from e
        difference = paired_difference(candidate.outcomes[neither].reset_index(drop=True), champion.outcomes,
                                       rules["n_boot"], rules["seed"])
        difference["n"] = int(neither.sum())
        champion_figures = champion.figures
    gates, failures = judge(candidate.figures, candidate.evidence, rules, difference)
    g = candidate.gate_set
    described = (f"gate set {rules['gate_manifest']}: {g['films']} adult films it never learnt from "
                 f"({g['covid']} COVID-19) of {', '.join(sorted(g['per_archive']))}; archives it never trained on: "
                 f"{', '.join(g['unseen_archives']) or 'none here'}")
    f = candidate.figures
    passed = (f"all gates hold: sensitivity {f['sensitivity']['value']:.3f}, specificity "
              f"{f['specificity']['value']:.3f} at threshold {candidate.evidence.get('threshold', float('nan')):.3g}"
              + (f", not worse than the champion by more than {rules['non_inferiority']['margin']}" if difference
                 else "; no champion yet"))
    reason = ("; ".join(failures) if failures else passed) + f" ({described})"
    decision = Decision(not failures, reason, {**candidate.to_dict()}, champion_figures, gates,
                        dict(difference) if difference else None)
    return decision, g


def judge_segmenter(platform: PlatformConfig, model: str, version: str, champion: str | None) -> Decision:
    rules = platform.promotion["segmenter"]
    rows = frozen_rows(rules, platform.storage)
    uri = platform.tracking_uri
    candidate = segmenter_outputs(uri, f"models:/{model}/{version}", rows, platform.storage)
    current = segmenter_outputs(uri, f"models:/{model}/{champion}", rows, platform.storage) if champion else None
    return decide(candidate, current, rules, int(platform.promotion.get("n_boot", 1000)),
                  int(platform.promotion.get("seed", 0)))


# --- the workflow ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: int           # EXIT_*
    line: str


def promote(cfg: PromoteConfig, platform: PlatformConfig) -> Outcome:
    """Gated promotion, ``--rollback`` or ``--unlock`` of one registered model (a classifier
    version is promoted as its screen), under the lock, with an audit record."""
    uri, aliases = platform.tracking_uri, platform.aliases
    names = platform.registered_models
    screen_model = names.get("screen", "cxr-screen")
    model = cfg.model
    if model not in (screen_model, names.get("classifier"), names.get("segmenter")):
        raise PromotionError(f"unknown model {model!r}; choices: {sorted({screen_model, names['segmenter']})} "
                             f"(a {names['classifier']} version is promoted as its screen)")
    if cfg.unlock:
        return unlock(platform, screen_model if model == names.get("classifier") else model, cfg)
    version = cfg.version
    if model == names.get("classifier"):
        if cfg.rollback:
            model = screen_model
        else:
            version = version or alias_version(uri, model, aliases["challenger"])
            if not version:
                raise PromotionError(f"no --version given and no {aliases['challenger']} alias on {model}")
            _check_version(uri, model, version)
            from cxr.workflows.screen import screen_of_classifier

            version, model = screen_of_classifier(platform, version), screen_model
    with PromotionLock(uri, model, float(platform.promotion.get("lock_ttl_s", 120)),
                       cfg.user or getpass.getuser()) as lock:
        recovered = recover_pending(platform, model)
        before = aliases_now(uri, model, aliases)
        if cfg.rollback:
            return rollback(platform, model, before, cfg, lock)
        version = version or alias_version(uri, model, aliases["challenger"])
        if not version:
            raise PromotionError(f"no --version given and no {aliases['challenger']} alias on {model}")
        _check_version(uri, model, version)
        if version == before["champion"]:
            return Outcome(EXIT_PROMOTED, f"{recovered}v{version} is already {aliases['champion']}; nothing to do")
        if model == screen_model:
            decision, _ = judge_screen(platform, f"models:/{model}/{version}",
                                       f"models:/{model}/{before['champion']}" if before["champion"] else None)
        else:
            decision = judge_segmenter(platform, model, version, before["champion"])
        reason = decision.reason + (f"; {cfg.reason}" if cfg.reason else "")
        after = {"champion": version, "previous_champion": before["champion"] or before["previous_champion"]}
        record = audit_record("promote", model, decision, before, after if decision.passed else before, reason, cfg.user)
        if not decision.passed:
            record["outcome"] = "rejected"
            run_id = record_refusal(platform, record)
            return Outcome(EXIT_REJECTED, f"{model} v{version} rejected, nothing changed: {reason} (audit run {run_id})")
        lock.check()
        run_id = commit(platform, record)
    was = f"was v{before['champion']}" if before["champion"] else "first champion"
    return Outcome(EXIT_PROMOTED, f"{recovered}{model} v{version} is now {aliases['champion']} ({was}): {reason} "
                                  f"(audit run {run_id})")


def _check_version(uri: str, model: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise PromotionError(f"--version must be a version number, got {version!r}")
    try:
        tracking.client(uri).get_model_version(model, str(version))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PromotionError(f"{model} has no version {version}") from e
        raise


def rollback(platform: PlatformConfig, model: str, before: dict, cfg: PromoteConfig, lock: PromotionLock) -> Outcome:
    """Restore the state recorded before the last promotion not yet rolled back."""
    uri = platform.tracking_uri
    records = history(uri, platform.experiments["promotion"], model)
    stack = restore_stack(records)
    if not stack or not stack[-1]["champion"]:
        return Outcome(EXIT_FAILED, f"{model}: nothing to roll back to (champion v{before['champion']} "
                                    f"{'is the first champion cxr promote recorded' if stack else 'has no promotion to undo'}); "
                                    "nothing changed")
    if records and records[-1]["after"]["champion"] != before["champion"]:
        return Outcome(EXIT_FAILED, f"{model}: its champion v{before['champion']} is not the one the audit trail "
                                    f"records (v{records[-1]['after']['champion']}): moved outside cxr promote; "
                                    "nothing changed (promote a version explicitly)")
    target = stack.pop()
    after = {"champion": target["champion"], "previous_champion": stack[-1]["champion"] if stack else None}
    record = audit_record("rollback", model, None, before, after, cfg.reason or "rollback", cfg.user)
    record["outcome"] = "promoted"
    lock.check()
    run_id = commit(platform, record)
    return Outcome(EXIT_PROMOTED, f"{model} rolled back: champion v{before['champion']} -> v{after['champion']} "
                                  f"(the recorded state before v{before['champion']}; previous-champion now "
                                  f"{('v' + after['previous_champion']) if after['previous_champion'] else 'none'}) "
                                  f"(audit run {run_id})")


def unlock(platform: PlatformConfig, model: str, cfg: PromoteConfig) -> Outcome:
    """Remove a promotion lock (a crashed promotion's, before it expires), with an audit record."""
    uri = platform.tracking_uri
    held = lock_holder(uri, model)
    if held is None:
        return Outcome(EXIT_PROMOTED, f"{model}: no promotion lock; nothing to do")
    tracking.client(uri).delete_registered_model(lock_name(model))
    state = aliases_now(uri, model, platform.aliases)
    record = audit_record("unlock", model, {"lock": held}, state, state, cfg.reason or "unlock", cfg.user)
    record["outcome"] = "unlocked"
    run_id = record_refusal(platform, record)
    return Outcome(EXIT_PROMOTED, f"{model}: removed the promotion lock held by {held.get('owner')} (audit run {run_id})")
