"""The search space of ``cxr tune``, its study, and the Optuna searcher behind Ray Tune.

The study lives in an Optuna storage (SQLite by default), so a killed study resumes: trials
that finished are loaded back, a trial the kill interrupted is marked failed and run again, and
only the missing ones run. A study is keyed by its base config and its data's digest
(``study_key``): asked to continue on another base, it refuses. The sampler's seed is drawn
from the key and the number of trials so far, so a resumed study never replays the draws of an
earlier session (a fixed seed would: below its startup trials TPE samples at random).
Trials are judged by ``best_val_loss``, the lowest validation loss so far: the epoch a
fine-tune keeps.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from cxr.config import TuneJobConfig

METRIC, MODE = "best_val_loss", "min"
# What a study's key leaves out: where results go, what things are called, how many workers, the
# manifest's path (its content is in the key as the data digest) and the searched values.
NOT_THE_RECIPE = ("run_name", "storage_path", "register", "tuned_by", "manifest", "num_workers", "load_threads",
                  "stage1_lr", "stage2_lr", "dropout", "weight_decay")      # the last four: what the study searches


class StudyMismatch(ValueError):
    """The study exists with another base config or data."""


def search_space(cfg: TuneJobConfig) -> dict[str, Any]:
    """Stage learning rates and weight decay log-uniform, dropout uniform."""
    return {"stage1_lr": tune.loguniform(*cfg.stage1_lr_range),
            "stage2_lr": tune.loguniform(*cfg.stage2_lr_range),
            "dropout": tune.uniform(*cfg.dropout_range),
            "weight_decay": tune.loguniform(*cfg.weight_decay_range)}


def study_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url)


def study_key(base_config: dict, data_digest: str) -> str:
    """What makes trials comparable: the base finetune config (what trains) and the data."""
    recipe = {k: v for k, v in base_config.items() if k not in NOT_THE_RECIPE}
    text = json.dumps({"base": recipe, "data": data_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_study(cfg: TuneJobConfig, key: str) -> dict:
    """Create or reopen the study; refuse one made for another base or data; mark the trials a
    killed session left running as failed. Returns {"finished", "interrupted", "seed"}."""
    storage = study_storage(cfg.study_storage)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="minimize" if MODE == "min"
                                else "maximize", load_if_exists=True)
    recorded = study.user_attrs.get("cxr_key")
    if recorded is None and study.trials:
        raise StudyMismatch(f"study {cfg.study_name!r} has {len(study.trials)} trials of an unknown base (a study "
                            "from before studies were keyed); name a new study (--study-name)")
    if recorded is not None and recorded != key:
        raise StudyMismatch(f"study {cfg.study_name!r} was run on another base config or data (key {recorded[:12]}, "
                            f"now {key[:12]}): its trials do not compare; name a new study (--study-name)")
    study.set_user_attr("cxr_key", key)
    interrupted = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_system_attr(trial._trial_id, "cxr_interrupted", True)    # while it can still be written
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        interrupted += 1
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    seed = (int(key[:8], 16) + len(study.trials)) % 2**31
    seeds = list(study.user_attrs.get("cxr_sampler_seeds", [])) + [seed]
    study.set_user_attr("cxr_sampler_seeds", seeds)
    return {"finished": finished, "interrupted": interrupted, "seed": seed}


def searcher(cfg: TuneJobConfig, seed: int) -> OptunaSearch:
    return OptunaSearch(metric=METRIC, mode=MODE, study_name=cfg.study_name,
                        storage=study_storage(cfg.study_storage), sampler=optuna.samplers.TPESampler(seed=seed))


def scheduler(cfg: TuneJobConfig, max_epochs: int) -> ASHAScheduler:
    """ASHA on the epoch count: every trial runs ``grace_epochs``, then the worse ones stop."""
    return ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode=MODE,
                         max_t=max(max_epochs, 1), grace_period=min(cfg.grace_epochs, max(max_epochs, 1)))
