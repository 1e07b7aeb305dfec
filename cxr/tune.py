"""The search space of ``cxr tune`` and the Optuna searcher behind Ray Tune.

The study lives in an Optuna storage (SQLite by default), so a killed study resumes: trials
that finished are loaded back and only the missing ones run.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from cxr.config import TuneJobConfig

METRIC, MODE = "val_loss", "min"


def search_space(cfg: TuneJobConfig) -> dict[str, Any]:
    """Stage learning rates and weight decay log-uniform, dropout uniform."""
    return {"stage1_lr": tune.loguniform(*cfg.stage1_lr_range),
            "stage2_lr": tune.loguniform(*cfg.stage2_lr_range),
            "dropout": tune.uniform(*cfg.dropout_range),
            "weight_decay": tune.loguniform(*cfg.weight_decay_range)}


def study_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url)


def finished_trials(cfg: TuneJobConfig) -> int:
    """Trials of the study that already finished (0 for a new study)."""
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=study_storage(cfg.study_storage))
    except KeyError:
        return 0
    return sum(t.state.is_finished() for t in study.trials)


def searcher(cfg: TuneJobConfig, seed: int = 0) -> OptunaSearch:
    return OptunaSearch(metric=METRIC, mode=MODE, study_name=cfg.study_name,
                        storage=study_storage(cfg.study_storage), sampler=optuna.samplers.TPESampler(seed=seed))


def scheduler(cfg: TuneJobConfig, max_epochs: int) -> ASHAScheduler:
    """ASHA on the epoch count: every trial runs ``grace_epochs``, then the worse ones stop."""
    return ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode=MODE,
                         max_t=max(max_epochs, 1), grace_period=min(cfg.grace_epochs, max(max_epochs, 1)))
