"""Retraining workflow: prepare-data -> (segmenter) -> (pretrain) -> finetune -> challenger ->
gated promotion, as one job, idempotent per snapshot (the digest of the manifests it reads and
of its training settings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from cxr import tracking
from cxr.config import (FinetuneConfig, PlatformConfig, PrepareDataConfig, PretrainConfig, PromoteConfig,
                        RetrainConfig, SegmenterTrainConfig, config_to_dict, load_config)
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.workflows.promotion import EXIT_FAILED, EXIT_PROMOTED, Outcome, PromotionError, promote
from cxr.workflows.classifier import finetune, pretrain
from cxr.workflows.data import prepare_manifests
from cxr.workflows.segmenter import train_segmenter


log = logging.getLogger(__name__)
DEFAULT_TUNED = RetrainConfig.__dataclass_fields__["finetune_config"].default


class RetrainError(RuntimeError):
    """The retraining cannot start (its data cannot be prepared)."""


def snapshot_digest(paths: list[Path], recipe: dict | None = None) -> str:
    """One digest of what a retraining reads: the manifests (content, not location) and the
    recipe (every training setting), so a changed config is new work, as new data is."""
    parts = [f"{p.name}:{manifest_digest(read_manifest(str(p)))}" for p in paths]
    if recipe:
        parts.append("recipe:" + json.dumps(recipe, sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def earlier_run(tracking_uri: str, experiment: str, snapshot: str) -> str | None:
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`cxr.snapshot` = '{snapshot}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def _promote(platform: PlatformConfig, model: str, version: str, snapshot: str) -> Outcome:
    """The gated promotion; a refusal (lock held, gates failed) is an outcome, not a crash."""
    try:
        return promote(PromoteConfig(model=model, version=version, reason=f"retrain {snapshot[:12]}"), platform)
    except PromotionError as e:
        return Outcome(EXIT_FAILED, f"refused: {e}")


def retrain(cfg: RetrainConfig, platform: PlatformConfig, start_ray: Callable[[], None]) -> dict:
    """The chain, once per data snapshot. Returns {"snapshot", "done_by"} when this snapshot was
    retrained before, else {"snapshot", "steps", "run_id"}; raises ``RetrainError`` when the
    data cannot be prepared. ``start_ray`` (the entry point's) runs only when there is work."""
    uri, names, aliases = platform.tracking_uri, platform.registered_models, platform.aliases
    manifests = Path(cfg.manifests)
    try:
        summary = prepare_manifests(PrepareDataConfig(data_root=cfg.data_root, out=str(manifests)), platform)
    except (FileNotFoundError, ValueError) as e:
        raise RetrainError(f"prepare-data failed: {e}") from e
    if any(s["patient_leaks"] for s in summary.values()):
        raise RetrainError(f"prepare-data found a patient in two splits of {manifests}")
    tuned = cfg.finetune_config
    if tuned and not Path(tuned).exists():
        if tuned != DEFAULT_TUNED:
            raise RetrainError(f"--finetune-config {tuned}: no such file")
        log.warning("no tuned config at %s (cxr tune writes it): fine-tuning with the finetune defaults", tuned)
        tuned = None
    finetune_cfg = load_config(FinetuneConfig, tuned)
    # The task of the finetune config (e.g. dataset2-4class), from this run's fresh manifests.
    finetune_manifest = manifests / "tasks" / Path(finetune_cfg.manifest).name
    finetune_cfg = dataclasses.replace(finetune_cfg, manifest=str(finetune_manifest))
    inputs = [finetune_manifest] + ([manifests / "lungseg.parquet"] if cfg.train_segmenter else []) + \
        ([manifests / "tasks" / "source.parquet"] if cfg.pretrain else [])
    segmenter_cfg = load_config(SegmenterTrainConfig, cfg.segmenter_config) if cfg.train_segmenter else None
    pretrain_cfg = load_config(PretrainConfig, cfg.pretrain_config) if cfg.pretrain else None
    recipe = {"finetune": config_to_dict(dataclasses.replace(finetune_cfg, manifest=finetune_manifest.name)),
              "segmenter": config_to_dict(segmenter_cfg) if segmenter_cfg else None,
              "pretrain": config_to_dict(pretrain_cfg) if pretrain_cfg else None, "promote": cfg.promote}
    snapshot = snapshot_digest(inputs, recipe)
    done = earlier_run(uri, platform.experiments["retrain"], snapshot)
    if done and not cfg.force:
        return {"snapshot": snapshot, "done_by": done}
    start_ray()
    steps = {}
    with tracking.tracked_run(uri, platform.experiments["retrain"], f"retrain-{snapshot[:8]}",
                              tags={"cxr.job": "retrain", "cxr.snapshot": snapshot},
                              artifact_location=platform.artifact_location) as run_id:
        tracking.log_params(uri, run_id, {**config_to_dict(cfg), "finetune": config_to_dict(finetune_cfg)})
        masked = finetune_cfg.segmenter is not None     # the screening recipe sees whole images
        segmenter_uri = finetune_cfg.segmenter
        if cfg.train_segmenter:
            seg_cfg = load_config(SegmenterTrainConfig, cfg.segmenter_config,
                                  {"manifest": str(manifests / "lungseg.parquet"), "run_name": f"retrain-{snapshot[:8]}"})
            seg = train_segmenter(seg_cfg, platform)
            tracking.set_alias(uri, names["segmenter"], aliases["challenger"], seg["version"])
            segmenter_uri = f"models:/{names['segmenter']}/{seg['version']}"
            steps["segmenter"] = {"version": seg["version"], "test_dice_mean": seg["report"]["all"]["mean"]}
            if cfg.promote:
                outcome = _promote(platform, names["segmenter"], seg["version"], snapshot)
                steps["segmenter"]["promotion"] = outcome.line
                steps["segmenter"]["promotion_code"] = outcome.code
                if outcome.code == EXIT_PROMOTED:
                    segmenter_uri = f"models:/{names['segmenter']}@{aliases['champion']}"
        pretrain_run = finetune_cfg.pretrain_run
        if cfg.pretrain:
            pre = pretrain(load_config(PretrainConfig, cfg.pretrain_config, {
                "manifest": str(manifests / "tasks" / "source.parquet"), "run_name": f"retrain-{snapshot[:8]}"}), platform)
            pretrain_run = pre["run_id"]
            steps["pretrain"] = {"run_id": pretrain_run, "best_val_loss": pre["meta"]["val_loss"]}
        cls = finetune(dataclasses.replace(finetune_cfg, segmenter=segmenter_uri if masked else None,
                                           pretrain_run=pretrain_run, register=True,
                                           run_name=f"retrain-{snapshot[:8]}"), platform)
        tracking.set_alias(uri, names["classifier"], aliases["challenger"], cls["version"])
        steps["classifier"] = {"version": cls["version"], "test_accuracy": cls["report"]["metrics"]["accuracy"]["value"]}
        if cfg.promote:
            outcome = _promote(platform, names["classifier"], cls["version"], snapshot)
            steps["classifier"]["promotion"] = outcome.line
            steps["classifier"]["promotion_code"] = outcome.code
        tracking.log_dict(uri, run_id, steps, "steps.json")
    return {"snapshot": snapshot, "steps": steps, "run_id": run_id}
