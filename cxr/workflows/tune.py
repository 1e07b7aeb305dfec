"""Tuning workflow: Optuna, through Ray Tune, over the fine-tuning learning rates, dropout and
weight decay, with ASHA early stopping. Each trial is a Ray Train run and an MLflow run nested
under the study's run. The best configuration is written as a YAML that ``cxr finetune
--config`` accepts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cxr import tracking
from cxr.config import FinetuneConfig, PlatformConfig, TuneJobConfig, config_to_dict, config_to_plain, load_config
from cxr.data.storage import absolute_uri
from cxr.train.common import ray_storage
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.tune import METRIC, MODE, open_study, scheduler, search_space, searcher, study_key, study_storage
from cxr.workflows.classifier import initial_state, load_task, make_trainer, put_task


def run_study(cfg: TuneJobConfig, platform: PlatformConfig) -> dict:
    """Run the study's missing trials (Ray must be up), write the best config as a finetune
    YAML; returns the best trial's params and value, the trials, the YAML path and the run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    uri = platform.tracking_uri
    base = load_config(FinetuneConfig, cfg.finetune_config)
    base = dataclasses.replace(base, manifest=absolute_uri(base.manifest), register=False,
                               storage_path=str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path
                               else cfg.storage_path)
    if cfg.study_storage.startswith("sqlite:///"):
        Path(cfg.study_storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    key = study_key(config_to_dict(base), manifest_digest(read_manifest(base.manifest, platform.storage)))
    opened = open_study(cfg, key)           # refuses another base; marks a killed session's trials failed
    interrupted_runs = close_interrupted_runs(uri, platform.experiments["tune"], cfg.study_name)
    remaining = cfg.num_samples - opened["finished"]
    with tracking.tracked_run(uri, platform.experiments["tune"], cfg.run_name or cfg.study_name,
                              tags={"cxr.job": "tune", "cxr.study": cfg.study_name, "cxr.study_key": key},
                              artifact_location=platform.artifact_location) as study_run:
        tracking.log_params(uri, study_run, {**config_to_dict(cfg), "finetune_base": config_to_dict(base),
                                             "study_key": key, "sampler_seed": opened["seed"],
                                             "resumed_finished_trials": opened["finished"],
                                             "interrupted_trials": opened["interrupted"]})
        task = load_task(base, platform)
        init_state, _ = initial_state(base, platform)
        refs = put_task(base, task, init_state)

        def trial(params: dict) -> None:
            trial_cfg = dataclasses.replace(base, **params)
            context = tune.get_context()
            run_id = tracking.start_run(uri, platform.experiments["tune"], context.get_trial_name(),
                                        tags={"cxr.job": "tune-trial", "cxr.study": cfg.study_name,
                                              "cxr.trial_id": context.get_trial_id()},
                                        artifact_location=platform.artifact_location, parent_run_id=study_run)
            tracking.log_params(uri, run_id, config_to_dict(trial_cfg))
            make_trainer(trial_cfg, platform, refs, run_id, f"trial-{run_id[:8]}",
                         callbacks=[TuneReportCallback()]).fit()
            # The run is closed by the driver (_close_trial_runs), which alone knows whether the
            # scheduler stopped this trial or it failed.

        if remaining > 0:
            max_epochs = base.stage1_epochs + base.stage2_epochs
            tuner = tune.Tuner(
                # The trial function only drives a Ray Train run, whose workers hold the CPUs/GPUs.
                # Tune refuses an empty request, and any share of a CPU would leave a Train run
                # that uses every CPU (2 workers on 2 cores) waiting forever: it reserves 1 MiB of
                # Ray's logical memory instead.
                tune.with_resources(trial, {"memory": 2**20}),
                param_space=search_space(cfg),
                tune_config=tune.TuneConfig(search_alg=searcher(cfg, opened["seed"]), scheduler=scheduler(cfg, max_epochs),
                                            num_samples=remaining, max_concurrent_trials=cfg.max_concurrent),
                run_config=tune.RunConfig(name=f"tune-{study_run[:8]}", **ray_storage(cfg.storage_path, platform.storage)))
            _close_trial_runs(uri, platform.experiments["tune"], study_run, tuner.fit(), max_epochs)
        best = _best_params(cfg)
        best_cfg = dataclasses.replace(base, **best["params"], register=True,
                                       tuned_by=f"study {cfg.study_name} (key {key[:12]}) trial {best['number']}, "
                                                f"MLflow run {study_run}")
        out = Path(cfg.best_config_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# written by cxr tune: the best trial of study "
                       f"{cfg.study_name!r} ({METRIC} {best['value']:.4f}); use: cxr finetune --config {out}\n"
                       + yaml.safe_dump(config_to_plain(best_cfg), sort_keys=False))
        tracking.log_params(uri, study_run, {f"best_{k}": v for k, v in best["params"].items()})
        tracking.log_metrics(uri, study_run, {f"best_{METRIC}": best["value"], "trials": best["trials"]})
        tracking.log_artifact(uri, study_run, out, "best")
    return {**best, "out": str(out), "run_id": study_run, "finished_before": opened["finished"],
            "interrupted": opened["interrupted"], "closed_runs": interrupted_runs, "added": max(remaining, 0),
            "seed": opened["seed"]}


def close_interrupted_runs(tracking_uri: str, experiment: str, study: str) -> int:
    """The MLflow runs a killed session of ``study`` left RUNNING (its study run and trials):
    FAILED, tagged ``cxr.error`` interrupted. Returns how many trial runs there were."""
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    trials = 0
    for r in c.search_runs([exp.experiment_id], f"tags.`cxr.study` = '{study}' and attributes.status = 'RUNNING'"):
        c.set_tag(r.info.run_id, "cxr.error", "interrupted (the study was killed); its trial is run again")
        c.set_terminated(r.info.run_id, "FAILED")
        trials += r.data.tags.get("cxr.job") == "tune-trial"
    return trials


def _close_trial_runs(tracking_uri: str, experiment: str, study_run: str, results, max_epochs: int) -> None:
    """Close each trial's MLflow run with what happened to it: FINISHED (all epochs), KILLED
    (stopped early by ASHA; tag cxr.stopped_by) or FAILED (tag cxr.error)."""
    outcome = {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if result.error is not None:
            outcome[trial_id] = ("FAILED", {"cxr.error": str(result.error).splitlines()[0][:4000]})
        elif (result.metrics or {}).get("training_iteration", 0) < max_epochs:
            outcome[trial_id] = ("KILLED", {"cxr.stopped_by": "scheduler"})
        else:
            outcome[trial_id] = ("FINISHED", {})
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    for r in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{study_run}'"):
        if r.info.status != "RUNNING":
            continue
        status, tags = outcome.get(r.data.tags.get("cxr.trial_id"), ("FAILED", {"cxr.error": "no result"}))
        for k, v in tags.items():
            c.set_tag(r.info.run_id, k, v)
        c.set_terminated(r.info.run_id, status)


def _best_params(cfg: TuneJobConfig) -> dict:
    """The best finished trial of the whole study, this run's and earlier ones'."""
    import optuna

    study = optuna.load_study(study_name=cfg.study_name, storage=study_storage(cfg.study_storage))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not complete:
        raise RuntimeError(f"study {cfg.study_name!r} has no finished trial")
    best = min(complete, key=lambda t: t.value) if MODE == "min" else max(complete, key=lambda t: t.value)
    return {"params": dict(best.params), "value": float(best.value), "trials": len(complete), "number": best.number}
