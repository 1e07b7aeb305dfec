"""Retraining workflow: prepare-data -> (segmenter) -> (pretrain) -> finetune -> challenger ->
gated promotion, as one job, idempotent per data snapshot (the digest of the manifests it reads)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

from cxr import tracking
from cxr.config import (FinetuneConfig, PlatformConfig, PrepareDataConfig, PretrainConfig, PromoteConfig,
                        RetrainConfig, SegmenterTrainConfig, config_to_dict, load_config)
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.promotion import PromotionError, promote
from cxr.workflows.classifier import finetune, pretrain
from cxr.workflows.data import prepare_manifests
from cxr.workflows.segmenter import train_segmenter


class RetrainError(RuntimeError):
    """The retraining cannot start (its data cannot be prepared)."""


def snapshot_digest(paths: list[Path]) -> str:
    """One digest of the manifests a retraining reads (content, not location)."""
    parts = [f"{p.name}:{manifest_digest(read_manifest(str(p)))}" for p in paths]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def earlier_run(tracking_uri: str, experiment: str, snapshot: str) -> str | None:
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.`cxr.snapshot` = '{snapshot}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def _promote(platform: PlatformConfig, model: str, version: str, snapshot: str) -> tuple[bool, str]:
    """The gated promotion; a refusal (lock held, frozen set changed) is an outcome, not a crash."""
    try:
        return promote(PromoteConfig(model=model, version=version, reason=f"retrain {snapshot[:12]}"), platform)
    except PromotionError as e:
        return False, f"refused: {e}"


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
    finetune_cfg = load_config(FinetuneConfig, cfg.finetune_config if cfg.finetune_config and
                               Path(cfg.finetune_config).exists() else None)
    # The task of the finetune config (e.g. dataset2-4class), from this run's fresh manifests.
    finetune_manifest = manifests / "tasks" / Path(finetune_cfg.manifest).name
    finetune_cfg = dataclasses.replace(finetune_cfg, manifest=str(finetune_manifest))
    inputs = [finetune_manifest] + ([manifests / "lungseg.parquet"] if cfg.train_segmenter else []) + \
        ([manifests / "tasks" / "source.parquet"] if cfg.pretrain else [])
    snapshot = snapshot_digest(inputs)
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
                ok_seg, line = _promote(platform, names["segmenter"], seg["version"], snapshot)
                steps["segmenter"]["promotion"] = line
                if ok_seg:
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
            _, line = _promote(platform, names["classifier"], cls["version"], snapshot)
            steps["classifier"]["promotion"] = line
        tracking.log_dict(uri, run_id, steps, "steps.json")
    return {"snapshot": snapshot, "steps": steps, "run_id": run_id}
