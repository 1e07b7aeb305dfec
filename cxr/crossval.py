"""Leave-one-archive-out: the recipes, the folds, the per-archive report and the tables (the
threshold rules they judge are ``cxr.operating_point``).

An archive is where an image comes from (``archive`` column of the manifests: Kermany, each
origin inside the COVID collection, Montgomery, Shenzhen, JSRT, TBX11K). For each archive a
recipe trains on, one fold trains without it, chooses its threshold without it, and reports on
all of it; archives the recipe never trains on are reported by the fold that holds nothing out.
The workflow that trains the folds is ``cxr.workflows.crossval``; everything here is numpy,
pandas and scikit-learn on its per-image predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.metrics import auroc_interval, screening_metrics
from cxr.operating_point import local_negatives_curve

LABELS_4 = ("covid", "normal", "bacterial", "viral")

# name -> the task manifest it trains on, whether it is lung-masked (by ``--segmenter``), and
# its other finetune overrides over the --finetune-config. Every knob a recipe is about is
# named, so a change of the finetune defaults cannot change a recipe.
RECIPES: dict[str, dict] = {
    # The paper's protocol: dataset II (Kermany's children + the COVID collection), lung-masked.
    "paper": {"task": "dataset2-4class", "masked": True,
              "overrides": {"archive_balanced": False, "photometric": False}},
    # Adult negatives added, no mask: the best of the earlier ablation (docs/RESULTS.md).
    "deconfounded-nomask": {"task": "deconfounded-4class", "masked": False,
                            "overrides": {"archive_balanced": False, "photometric": False}},
    # The screening recipe: every archive's labelled adults, no mask, each archive weighted
    # the same, and photometric augmentation against archive style.
    "screen": {"task": "screen-4class", "masked": False,
               "overrides": {"archive_balanced": True, "photometric": True}},
}


def recipe_overrides(recipe: str, segmenter: str | None) -> dict:
    """The finetune overrides of ``recipe``; a masked recipe is masked by ``segmenter``."""
    spec = RECIPES[recipe]
    return {**spec["overrides"], "segmenter": segmenter if spec["masked"] else None}


GOAL_SENSITIVITY = 0.90      # on a held-out archive with COVID
GOAL_SPECIFICITY = 0.85      # on a held-out archive without, at the same threshold
# How a fold's threshold is chosen on its validation split (cxr crossval reports each):
# "worst archive": every archive with enough negatives keeps the specificity; "negative
# archives": every archive without COVID does (a new hospital's routine films, not the
# handful of non-COVID case reports inside a COVID collection); "pooled": the pool does.
RULES = ("worst archive", "negative archives", "pooled")
MIN_FOR_AUROC = 5            # COVID and other images an archive needs before its AUROC is reported
ALL = "(none held out)"


def check_recipes(names) -> None:
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choices: {sorted(RECIPES)}")


def plan_folds(task: pd.DataFrame, min_images: int = 20) -> list[str]:
    """The archives to hold out, one fold each (largest first), then ``ALL``: every archive of
    the task's train/val rows with at least ``min_images`` images whose removal still leaves
    COVID and non-COVID images to train on."""
    rows = task[task["split"].isin(["train", "val"])]
    folds = []
    for archive, n in rows["archive"].value_counts().items():
        rest = rows.loc[rows["archive"] != archive, "label"]
        if n >= min_images and (rest == "covid").any() and (rest != "covid").any():
            folds.append(str(archive))
    return [*folds, ALL]


def fold_task(task: pd.DataFrame, held_out: str) -> pd.DataFrame:
    """The training rows of a fold: the task's train and val rows outside the held-out archive."""
    keep = task["split"].isin(["train", "val"]) & (task["archive"] != held_out)
    return task[keep].reset_index(drop=True)


def fold_evaluation(universe: pd.DataFrame, task: pd.DataFrame, held_out: str) -> pd.DataFrame:
    """The rows a fold reports on, with ``held_out`` True where the fold never saw the archive:
    all of its archive; for ``ALL``, the archives the task never trains on, and the test split
    of those it does (in-distribution, for comparison)."""
    if held_out != ALL:
        return universe[universe["archive"] == held_out].assign(held_out=True)
    trained = set(task["archive"])
    outside = ~universe["archive"].isin(trained)
    inside_test = universe["archive"].isin(trained) & (universe["split"] == "test")
    return universe[outside | inside_test].assign(held_out=outside[outside | inside_test])


# --- per-archive report ---------------------------------------------------------------------------

def archive_report(rows: pd.DataFrame, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """One archive's figures from its per-image ``p_covid`` and ``is_covid``: counts, AUROC
    where it holds at least ``MIN_FOR_AUROC`` of both classes, and sensitivity / specificity at ``threshold``, with 95%
    bootstrap intervals."""
    positive, score = rows["is_covid"].to_numpy(bool), rows["p_covid"].to_numpy(float)
    out = {"n_covid": int(positive.sum()), "n_other": int((~positive).sum())}
    rates = screening_metrics(positive, score, threshold, n_boot, seed)
    if positive.any():
        out["sensitivity"] = rates["sensitivity"]
    if (~positive).any():
        out["specificity"] = rates["specificity"]
    if min(positive.sum(), (~positive).sum()) >= MIN_FOR_AUROC:
        out["auroc"] = auroc_interval(positive, score, n_boot, seed)
    return out


def shortfall(report: dict) -> float:
    """How far an archive is from its goal (negative: short of it); the table's sort key."""
    gaps = [report[k]["value"] - goal for k, goal in (("sensitivity", GOAL_SENSITIVITY),
                                                      ("specificity", GOAL_SPECIFICITY)) if k in report]
    return min(gaps) if gaps else 0.0


def _cell(metric: dict | None) -> str:
    if not metric or not np.isfinite(metric["value"]):
        return "-"
    return f"{metric['value']:.2f} [{metric['low']:.2f}, {metric['high']:.2f}]"


def archive_table(results: list[dict]) -> str:
    """Markdown, one row per recipe and held-out archive, worst first within a recipe."""
    lines = ["| recipe | held-out archive | fold trained without it | COVID / other | AUROC | sensitivity | "
             "specificity | goal met |", "|---|---|---|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        rows = sorted((r for r in results if r["recipe"] == recipe), key=lambda r: shortfall(r["report"]))
        for r in rows:
            rep = r["report"]
            met = "yes" if shortfall(rep) >= 0 else "no"
            lines.append(f"| {recipe} | {r['archive']} | {r['fold']} | {rep['n_covid']} / {rep['n_other']} | "
                         f"{_cell(rep.get('auroc'))} | {_cell(rep.get('sensitivity'))} | "
                         f"{_cell(rep.get('specificity'))} | {met} |")
    return "\n".join(lines)


def recipe_summary(results: list[dict]) -> str:
    """Markdown, one row per recipe and threshold rule: the mean held-out AUROC (archives that
    have one), the lowest sensitivity on an archive with COVID, the lowest specificity on an
    archive without, and how many archives meet their goal."""
    lines = ["| recipe | threshold rule | mean held-out AUROC (archives) | lowest sensitivity, archives with COVID | "
             "lowest specificity, archives without | archives meeting the goal |", "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["recipe"], r["rule"]) for r in results)
    for recipe, rule in keys:
        reports = [r["report"] for r in results if (r["recipe"], r["rule"]) == (recipe, rule)]
        aurocs = [x["auroc"]["value"] for x in reports if "auroc" in x]
        sens = [x["sensitivity"]["value"] for x in reports if x["n_covid"]]
        spec = [x["specificity"]["value"] for x in reports if not x["n_covid"]]
        met = sum(shortfall(x) >= 0 for x in reports)
        mean_auroc = float(np.mean(aurocs)) if aurocs else float("nan")
        lines.append(f"| {recipe} | {rule} | {mean_auroc:.2f} ({len(aurocs)}) | "
                     f"{min(sens) if sens else float('nan'):.2f} | {min(spec) if spec else float('nan'):.2f} | "
                     f"{met} of {len(reports)} |")
    return "\n".join(lines)


LOCAL_SIZES = (10, 20, 30, 50, 100, 200)


def local_negatives_table(predictions: pd.DataFrame, thresholds: dict[tuple[str, str], float],
                          specificity: float = 0.90, min_negatives: int = 30, seed: int = 0) -> str:
    """Markdown: for each held-out archive with at least ``min_negatives`` negatives, its
    specificity (and sensitivity, where it has COVID) at the fold's threshold, then after
    ``cxr calibrate``'s rule on n local negatives, for growing n: the mean and 5th percentile
    over 200 draws of the specificity on the archive's other negatives, and the mean
    sensitivity on its COVID films; an archive without COVID gets the sensitivity on the
    recipe's COVID films of every held-out origin (marked "pooled"), a stand-in for the COVID
    films a site would meet. ``predictions``: the folds' per-image rows (recipe, fold,
    archive, held_out, is_covid, p_covid); ``thresholds``: (recipe, fold) -> threshold."""
    lines = ["| recipe | held-out archive | negatives / COVID | at the fold's threshold: spec. / sens. | "
             + " | ".join(f"n = {n}" for n in LOCAL_SIZES) + " |", "|---|---|---|---|" + "---|" * len(LOCAL_SIZES)]
    held = predictions[predictions["held_out"]]
    for (recipe, fold, archive), rows in held.groupby(["recipe", "fold", "archive"], sort=False):
        neg = rows.loc[~rows["is_covid"], "p_covid"].to_numpy()
        pos = rows.loc[rows["is_covid"], "p_covid"].to_numpy()
        if len(neg) < min_negatives:
            continue
        t = thresholds[(recipe, fold)]
        before = f"{(neg < t).mean():.2f} / " + (f"{(pos >= t).mean():.2f}" if len(pos) else "-")
        pooled = not len(pos)
        if pooled:
            pos = held.loc[(held["recipe"] == recipe) & held["is_covid"], "p_covid"].to_numpy()
        cells = []
        for c in local_negatives_curve(neg, LOCAL_SIZES, specificity, seed=seed, positives=pos if len(pos) else None):
            sens = (f", sens. {c['sensitivity_mean']:.2f}{' (pooled)' if pooled else ''}"
                    if np.isfinite(c["sensitivity_mean"]) else "")
            cells.append(f"{c['specificity_mean']:.2f} (p5 {c['specificity_p05']:.2f}){sens}")
        cells += ["-"] * (len(LOCAL_SIZES) - len(cells))
        lines.append(f"| {recipe} | {archive} | {len(neg)} / {len(pos)} | {before} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
