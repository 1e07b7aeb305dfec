"""``cxr crossval``: train each leave-one-archive-out fold of each recipe with the fine-tune's
own pieces (``load_task``, ``fit``), calibrate and threshold it on its validation split, and
predict the archives it reports on. The figures are computed in ``cxr.crossval``."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import tracking
from cxr.classification import inference_device, predict
from cxr.config import CrossvalConfig, FinetuneConfig, PlatformConfig, load_config
from cxr.crossval import (ALL, LABELS_4, RECIPES, RULES, archive_report, archive_table, check_recipes,
                          fold_evaluation, fold_task, local_negatives_table, plan_folds, recipe_overrides,
                          recipe_summary)
from cxr.operating_point import (SMALL, calibrated, fit_temperature, log_probabilities, rule_threshold,
                                 transfer_report, transfer_table, worst_archive_threshold)
from cxr.data.manifest import read_manifest, write_manifest
from cxr.metrics import ABOVE_ONE, threshold_for_specificity
from cxr.qc import classifier_features, synthetic_non_radiographs
from cxr.train.checkpoints import load_checkpoint
from cxr.workflows.classifier import classifier_card, fit, initial_state, load_task, log_task, put_task

log = logging.getLogger(__name__)


def fold_name(held_out: str) -> str:
    return "all" if held_out == ALL else held_out.replace("/", "-")


def ray_run_name(run_id: str) -> str:
    """The Ray Train run (under the storage path) that trains the fold of MLflow run ``run_id``."""
    return f"crossval-{run_id[:8]}"


def recipe_predictions(predictions: list[pd.DataFrame], recipe: str) -> pd.DataFrame | None:
    """The per-image predictions of ``recipe``'s folds so far, in one frame (None if none)."""
    mine = [p for p in predictions if len(p) and (p["recipe"] == recipe).all()]
    return pd.concat(mine, ignore_index=True) if mine else None


def log_probs(model, images: np.ndarray) -> np.ndarray:
    return log_probabilities(predict(model, images)[0])


def save_fold_features(path: Path, model, fold, evaluation_images: np.ndarray, views: pd.DataFrame | None,
                       platform: PlatformConfig, fcfg: FinetuneConfig) -> None:
    """The fold classifier's pooled features (``cxr.qc.classifier_features``) of its training and
    validation films, of the films it reports on (in ``<fold>.parquet``'s order), of the lateral
    films and CT slices (``views``) and of synthetic non-radiographs: what quality control is
    fitted on and judged by, per fold, without training anything again."""
    split = fold.rows["split"].to_numpy()
    arrays = {"train": classifier_features(model, fold.images[split == "train"]),
              "train_age_group": fold.rows.loc[split == "train", "age_group"].fillna("unknown").to_numpy(str),
              "val": classifier_features(model, fold.images[split == "val"]),
              "evaluation": classifier_features(model, evaluation_images),
              "synthetic": classifier_features(model, synthetic_non_radiographs(evaluation_images.shape[-1]))}
    if views is not None and len(views):
        view_images, _ = fold.preprocess.prepare(views["uri"].tolist(), platform.storage, fcfg.load_threads)
        arrays.update(views=classifier_features(model, view_images), views_uri=views["uri"].to_numpy(str),
                      views_kind=views["view"].to_numpy(str), views_split=views["split"].fillna("").to_numpy(str),
                      views_patient=views["patient_id"].to_numpy(str))
    np.savez_compressed(path, **arrays)


def run_fold(cfg: CrossvalConfig, platform: PlatformConfig, recipe: str, held_out: str, task: pd.DataFrame,
             universe: pd.DataFrame, folder: Path, cross_archive: list[dict] | None = None,
             views: pd.DataFrame | None = None, other_predictions: pd.DataFrame | None = None) -> dict:
    """Train one fold, and return its result (also written to ``folder``/<fold>.json, with the
    per-image predictions in <fold>.parquet). With ``cross_archive`` (the recipe's other folds'
    results), register the fold's model, its card holding them, its temperature and the
    operating point that transfers (``cxr.operating_point.transfer_report`` on ``other_predictions``,
    the other folds' per-image predictions, and this fold's out-of-archive ones)."""
    name = fold_name(held_out)
    manifest_uri = str((folder / f"{name}-train.parquet").resolve())
    write_manifest(fold_task(task, held_out), manifest_uri)
    overrides = {"manifest": manifest_uri, "classes": LABELS_4, "seed": cfg.seed, "pretrain_run": cfg.pretrain_run,
                 "register": False, "run_name": f"crossval-{recipe}-{name}", **recipe_overrides(recipe, cfg.segmenter)}
    fcfg = load_config(FinetuneConfig, cfg.finetune_config, overrides)
    with tracking.tracked_run(platform.tracking_uri, platform.experiments.get("crossval", "cxr-crossval"),
                              fcfg.run_name,
                              tags={"cxr.job": "crossval", "cxr.recipe": recipe, "cxr.held_out": held_out},
                              artifact_location=platform.artifact_location) as run_id:
        fold = load_task(fcfg, platform)
        init_state, init_origin = initial_state(fcfg, platform)
        log_task(platform, run_id, fcfg, fold, init_origin)
        result, minutes, _ = fit(fcfg, platform, put_task(fcfg, fold, init_state), run_id, ray_run_name(run_id))
        with result.get_best_checkpoint("val_loss", "min").as_directory() as ckpt:
            model, meta = load_checkpoint(ckpt, inference_device())

        val = fold.rows["split"] == "val"
        val_rows, val_lp = fold.rows[val], log_probs(model, fold.images[val.to_numpy()])
        temperature = fit_temperature(val_lp, val_rows["target"].to_numpy())
        val_p = calibrated(val_lp, temperature)[:, 0]
        val_covid = (val_rows["label"] == "covid").to_numpy()
        threshold, per_archive = worst_archive_threshold(val_covid, val_p, val_rows["archive"].to_numpy(),
                                                         cfg.min_specificity)
        val_rows[["uri", "archive", "label"]].assign(p_covid=val_p).to_parquet(folder / f"{name}-val.parquet",
                                                                               index=False)
        # The usual rule on the pooled split, for comparison (needs both classes there).
        pooled = (min(threshold_for_specificity(val_covid, val_p, cfg.min_specificity), ABOVE_ONE)
                  if 0 < val_covid.sum() < len(val_covid) else None)

        evaluation = fold_evaluation(universe, task, held_out).reset_index(drop=True)
        images, _ = fold.preprocess.prepare(evaluation["uri"].tolist(), platform.storage, fcfg.load_threads)
        lp = log_probs(model, images)
        probs = calibrated(lp, temperature)
        predictions = evaluation[["uri", "archive", "split", "finding", "age_group", "held_out"]].assign(
            recipe=recipe, fold=held_out, is_covid=(evaluation["label"] == "covid").to_numpy(),
            p_covid=probs[:, 0], p_covid_raw=np.exp(lp[:, 0]),
            **{f"p_{label}": probs[:, i] for i, label in enumerate(LABELS_4) if i})
        predictions.to_parquet(folder / f"{name}.parquet", index=False)
        save_fold_features(folder / f"{name}-features.npz", model, fold, images, views, platform, fcfg)

        archives = {}
        for archive, rows in predictions[predictions["held_out"]].groupby("archive"):
            archives[str(archive)] = archive_report(rows, threshold, cfg.n_boot, cfg.seed)
        inside = predictions[~predictions["held_out"]]
        in_distribution = archive_report(inside, threshold, cfg.n_boot, cfg.seed) if len(inside) else None
        out = {"recipe": recipe, "fold": held_out, "run_id": run_id, "minutes": minutes, "best_epoch": meta["epoch"],
               "temperature": temperature, "threshold": threshold, "threshold_per_val_archive": per_archive,
               "pooled_threshold": pooled, "n_train": int((fold.rows["split"] == "train").sum()),
               "n_val": int(val.sum()), "archives": archives, "in_distribution_test": in_distribution}
        tracking.log_dict(platform.tracking_uri, run_id, out, "crossval/fold.json")
        tracking.log_metrics(platform.tracking_uri, run_id, {"temperature": temperature, "threshold": threshold,
                                                             "train_minutes": minutes})
        if cross_archive is not None:
            transfer = transfer_report(pd.concat([other_predictions, predictions], ignore_index=True),
                                       cfg.transfer_specificity, cfg.n_boot, cfg.seed)
            (folder / "operating_point.json").write_text(json.dumps(transfer, indent=2))
            tracking.log_dict(platform.tracking_uri, run_id, transfer, "crossval/operating_point.json")
            screening = {"threshold": transfer["threshold"], "min_specificity": cfg.transfer_specificity,
                         "temperature": temperature,
                         "chosen_on": (f"out-of-archive predictions of the {recipe} folds (each archive predicted by "
                                       f"the fold trained without it): rule '{transfer['chosen']}', "
                                       f"{transfer['n_adult_negatives']} adult films without COVID-19 and "
                                       f"{transfer['n_covid']} COVID-19 films; chosen as {transfer['why']}")}
            card = classifier_card(fcfg, fold, meta, init_origin, {}, screening)
            held = cross_archive + [{"archive": a, "fold": "none held out", "report": r} for a, r in archives.items()]
            card = dataclasses.replace(card, metrics={
                "cross_archive": {"recipe": recipe, "held_out": held, "rule": "worst archive (each fold's validation)"},
                "operating_point": card_operating_point(transfer), "in_distribution_test": in_distribution,
                "best_val_loss": meta["val_loss"], "best_epoch": meta["epoch"]}).validate()
            out["version"] = tracking.register_model(platform.tracking_uri, platform.registered_models["classifier"],
                                                     run_id, model, card)
    (folder / f"{name}.json").write_text(json.dumps(out, indent=2))
    return out


def fold_model(folder: Path, name: str, storage_path: str = "out/ray"):
    """A finished fold's best checkpoint (Ray Train keeps the best one under ``storage_path``),
    loaded on the CPU: (model, meta)."""
    run_id = json.loads((Path(folder) / f"{name}.json").read_text())["run_id"]
    found = sorted(p for p in (Path(storage_path) / ray_run_name(run_id)).glob("checkpoint_*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no checkpoint of fold {name} (run {run_id}) under {storage_path}")
    return load_checkpoint(found[-1], "cpu")


def card_operating_point(transfer: dict) -> dict:
    """What the card keeps of ``transfer_report``: the rule, why, and every rule's threshold and
    pooled figures on unseen archives, and the chosen rule's per-archive figures (with the
    number of films behind each)."""
    return {"rule": transfer["chosen"], "why": transfer["why"], "specificity": transfer["specificity"],
            "threshold": transfer["threshold"], "n_adult_negatives": transfer["n_adult_negatives"],
            "n_covid": transfer["n_covid"],
            "rules": {r: {"threshold": v["threshold"], "pooled_unseen": v["pooled_unseen"]}
                      for r, v in transfer["rules"].items()},
            "per_archive": transfer["rules"][transfer["chosen"]]["per_archive"]}


def run_crossval(cfg: CrossvalConfig, platform: PlatformConfig) -> str:
    """Every fold of every recipe not yet in OUT (Ray must be up); then OUT/results.json and
    OUT/table.md. Returns the table."""
    check_recipes(cfg.recipes)
    out = Path(cfg.out)
    universe = read_manifest(str(Path(cfg.manifests) / "tasks" / "archives.parquet"))
    views_uri = Path(cfg.manifests) / "views.parquet"
    views = read_manifest(str(views_uri)) if views_uri.exists() else None
    results, predictions, thresholds = [], [], {}
    for recipe in cfg.recipes:
        task = read_manifest(str(Path(cfg.manifests) / "tasks" / f"{RECIPES[recipe]['task']}.parquet"))
        folder = out / recipe
        folder.mkdir(parents=True, exist_ok=True)
        folds = plan_folds(task, cfg.min_archive_images)
        for held_out in [f for f in folds if not cfg.folds or f in cfg.folds]:
            done = folder / f"{fold_name(held_out)}.json"
            register = cfg.register and held_out == ALL
            others = ([r for r in results if r["recipe"] == recipe and r["rule"] == "worst archive"]
                      if register else None)
            fold = json.loads(done.read_text()) if done.exists() else None
            if fold is None or (register and "version" not in fold):       # to do, or to register
                earlier = recipe_predictions(predictions, recipe) if register else None
                fold = run_fold(cfg, platform, recipe, held_out, task, universe, folder, others, views, earlier)
            log.info("%s, held out %s: threshold %.3f, %s", recipe, held_out, fold["threshold"],
                     {a: {k: round(v["value"], 3) for k, v in r.items() if isinstance(v, dict)}
                      for a, r in fold["archives"].items()})
            predicted = pd.read_parquet(folder / f"{fold_name(held_out)}.parquet")
            predictions.append(predicted)
            thresholds[(recipe, held_out)] = fold["threshold"]
            trained = "none held out" if held_out == ALL else "yes"
            results += [{"recipe": recipe, "archive": a, "fold": trained, "rule": "worst archive",
                         "threshold": fold["threshold"], "report": r} for a, r in fold["archives"].items()]
            # The same predictions at the other rules' thresholds, to compare the rules.
            with_covid = set(task.loc[task["label"] == "covid", "archive"]) | {SMALL}
            others = {"negative archives": rule_threshold(fold["threshold_per_val_archive"], with_covid),
                      "pooled": fold.get("pooled_threshold")}
            for rule, threshold in others.items():
                for archive, rows in predicted[predicted["held_out"]].groupby("archive"):
                    if threshold is not None:
                        results.append({"recipe": recipe, "archive": str(archive), "fold": trained, "rule": rule,
                                        "threshold": threshold,
                                        "report": archive_report(rows, threshold, cfg.n_boot, cfg.seed)})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    transfer = {}
    for recipe in cfg.recipes:
        mine = recipe_predictions(predictions, recipe)
        if mine is not None:
            transfer[recipe] = transfer_report(mine, cfg.transfer_specificity, cfg.n_boot, cfg.seed)
    (out / "operating_points.json").write_text(json.dumps(transfer, indent=2))
    text = "\n\n".join([recipe_summary(results)] + [
        f"Operating point that transfers, recipe {recipe} (threshold chosen on out-of-archive predictions):\n\n"
        + transfer_table(report) for recipe, report in transfer.items()] + [
        f"Threshold: {rule} rule.\n\n" + archive_table([r for r in results if r["rule"] == rule])
        for rule in RULES if any(r["rule"] == rule for r in results)])
    (out / "table.md").write_text(text + "\n")
    local = local_negatives_table(pd.concat(predictions, ignore_index=True), thresholds) if predictions else ""
    (out / "local_negatives.md").write_text(local + "\n")
    return text + "\n\nSpecificity after cxr calibrate's threshold from n local negatives:\n\n" + local
