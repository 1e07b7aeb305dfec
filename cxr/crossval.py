"""Leave-one-archive-out: the recipes, the folds, the operating point, and the tables.

An archive is where an image comes from (``archive`` column of the manifests: Kermany, each
origin inside the COVID collection, Montgomery, Shenzhen, JSRT, TBX11K). For each archive a
recipe trains on, one fold trains without it, chooses its threshold without it, and reports on
all of it; archives the recipe never trains on are reported by the fold that holds nothing out.
The workflow that trains the folds is ``cxr.workflows.crossval``; everything here is numpy,
pandas and scikit-learn on its per-image predictions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from cxr.metrics import ABOVE_ONE, auroc_interval, float32_above, screening_metrics, share_interval

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
MIN_ARCHIVE_NEGATIVES = 5    # a validation archive with fewer negatives joins the "small archives" group
SMALL = "(small archives)"
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


# --- calibration and the operating point ---------------------------------------------------------

# Temperature scaling searches T in [exp(-3), exp(3)]; a fit within about 2% of either end
# found no optimum inside (the data separate, or anti-separate, perfectly).
LOG_TEMPERATURE_BOUNDS = (-3.0, 3.0)


def temperature_at_bound(temperature: float) -> bool:
    low, high = (math.exp(b) for b in LOG_TEMPERATURE_BOUNDS)
    return not low * 1.025 < temperature < high / 1.01


def _best_temperature(nll) -> float:
    """The T minimising ``nll(log T)`` within ``LOG_TEMPERATURE_BOUNDS``."""
    return float(math.exp(minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded").x))


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """Log of softmax outputs (clipped away from 0): logits up to a per-row constant, which is
    all temperature scaling needs."""
    return np.log(np.clip(probs, 1e-12, None))


def fit_temperature(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the negative log-likelihood of
    softmax(logits / T) on a validation split. ``log_probs`` are log-softmax outputs, which
    are logits up to a per-row constant, so softmax(log_probs / T) is the same thing."""
    def nll(log_t: float) -> float:
        z = log_probs / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(z)), targets] - np.log(np.exp(z).sum(axis=1))).mean())
    return _best_temperature(nll)


def fit_temperature_binary(log_probs: np.ndarray, column: int, is_positive: np.ndarray) -> float:
    """Temperature scaling from a yes/no sample (a site's COVID or not, whose negatives need not
    be one of the model's classes): the T minimising the binary log-loss of column ``column``
    of softmax(log_probs / T)."""
    is_positive = np.asarray(is_positive, bool)

    def nll(log_t: float) -> float:
        p = np.clip(calibrated(log_probs, math.exp(log_t))[:, column], 1e-12, 1 - 1e-12)
        return float(-np.where(is_positive, np.log(p), np.log(1 - p)).mean())
    return _best_temperature(nll)


def calibrated(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    z = log_probs / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def worst_archive_threshold(is_positive: np.ndarray, score: np.ndarray, archives: np.ndarray,
                            min_specificity: float) -> tuple[float, dict[str, float]]:
    """The lowest threshold at which every validation archive keeps specificity >=
    ``min_specificity`` (the highest of the per-archive thresholds), and those thresholds.
    Archives with fewer than ``MIN_ARCHIVE_NEGATIVES`` negatives are pooled as one group.
    A pooled threshold is set by the largest archive's negatives, and a new hospital is
    more like one archive than like the pool. The other rules (``RULES``) pick from the same
    per-archive thresholds with ``rule_threshold``."""
    is_positive, score, archives = np.asarray(is_positive, bool), np.asarray(score, float), np.asarray(archives)
    negatives = pd.Series(archives[~is_positive]).value_counts()
    small = set(negatives[negatives < MIN_ARCHIVE_NEGATIVES].index)
    group = np.array([SMALL if a in small else a for a in archives])
    per_group = {}
    for g in np.unique(group[~is_positive]):
        neg = score[(group == g) & ~is_positive]
        per_group[str(g)] = specificity_threshold(neg, min_specificity)
    return rule_threshold(per_group, set()), per_group


def rule_threshold(per_archive: dict[str, float], excluded: set[str]) -> float:
    """The highest per-archive threshold outside ``excluded`` (0.5 when none is left)."""
    kept = [t for a, t in per_archive.items() if a not in excluded]
    return min(max(kept), ABOVE_ONE) if kept else 0.5


def specificity_threshold(negatives: np.ndarray, specificity: float, conformal: bool = False) -> float:
    """A threshold (``score >= threshold`` is positive) leaving at least a fraction
    ``specificity`` of ``negatives`` below it; with ``conformal``, of new negatives from the
    same distribution, on average: k = ceil((n + 1) * s) instead of ceil(n * s) scores below
    it (the plain quantile of n scores falls short by about 1 / n). It is a float32 value
    strictly between the k-th smallest score and the next (halfway where there is room), not
    on a score: the same image scored in float32 elsewhere (serving) must fall on the same
    side. Just above the largest score when n is too small for k (``ABOVE_ONE`` at most)."""
    scores = np.sort(np.asarray(negatives, float))
    if not len(scores):
        return 0.5
    k = min(max(math.ceil(((len(scores) + 1) if conformal else len(scores)) * specificity - 1e-9), 1), len(scores))
    return _threshold_above(scores, k)


def _threshold_above(scores: np.ndarray, k: int) -> float:
    """A float32 threshold with the ``k`` smallest of the sorted ``scores`` below it (see
    ``specificity_threshold``)."""
    low = float(np.float32(scores[k - 1]))
    above = float32_above(low)
    if k < len(scores):
        high = float(np.float32(scores[k]))
        middle = float(np.float32((low + high) / 2))
        if low < middle <= high:
            return middle
        if above <= high and high > low:
            return above
    return min(above, ABOVE_ONE)


def local_threshold(negatives: np.ndarray, specificity: float) -> float:
    """A threshold from a site's own negatives that gives specificity >= ``specificity`` on
    its new negatives, on average over samples (``specificity_threshold``, conformal)."""
    return specificity_threshold(negatives, specificity, conformal=True)


def local_negatives_curve(negatives: np.ndarray, sizes, specificity: float = 0.90, repeats: int = 200,
                          seed: int = 0, positives: np.ndarray | None = None) -> list[dict]:
    """How many local negatives a site needs: for each sample size n, ``repeats`` draws of n
    negatives fix ``local_threshold``; the specificity it gives on the site's other negatives
    (mean and 5th percentile over draws), and the sensitivity on ``positives`` (mean) if given."""
    negatives = np.asarray(negatives, float)
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        if n >= len(negatives):
            continue
        specs, sens = [], []
        for _ in range(repeats):
            picked = rng.permutation(len(negatives))
            sample, rest = negatives[picked[:n]], negatives[picked[n:]]
            t = local_threshold(sample, specificity)
            specs.append(float((rest < t).mean()))
            if positives is not None and len(positives):
                sens.append(float((np.asarray(positives) >= t).mean()))
        out.append({"n": int(n), "specificity_mean": float(np.mean(specs)),
                    "specificity_p05": float(np.percentile(specs, 5)),
                    "sensitivity_mean": float(np.mean(sens)) if sens else float("nan")})
    return out


# --- the operating point that transfers: chosen on out-of-archive predictions ------------------

# The card's threshold is chosen from predictions each made by the fold that never trained on
# the image's archive (what a new hospital's films are to the shipped model). Rules compared:
# "pooled adult negatives": specificity TRANSFER_SPECIFICITY on every adult film without COVID
# of every held-out archive, pooled; "archive-balanced pool": the same with every archive
# weighing the same; "worst archive": every held-out archive with at least
# MIN_ARCHIVE_NEGATIVES such films keeps it (what a 35-film archive can decide alone).
TRANSFER_RULES = ("pooled adult negatives", "archive-balanced pool", "worst archive")
TRANSFER_SPECIFICITY = 0.90


def out_of_archive(predictions: pd.DataFrame) -> pd.DataFrame:
    """One prediction per image, from the fold that never trained on its archive."""
    return predictions[predictions["held_out"]].drop_duplicates("uri").reset_index(drop=True)


def adult_negatives(rows: pd.DataFrame) -> np.ndarray:
    """Adult films without COVID-19 (age group known to be adult): the films a threshold must
    keep negative at a new hospital."""
    return (~rows["is_covid"].to_numpy(bool)) & (rows["age_group"] == "adult").to_numpy()


def transfer_threshold(rule: str, scores: np.ndarray, archives: np.ndarray,
                       specificity: float = TRANSFER_SPECIFICITY) -> float:
    """``rule``'s threshold (one of ``TRANSFER_RULES``) from negatives' ``scores`` and their
    ``archives``."""
    scores, archives = np.asarray(scores, float), np.asarray(archives)
    if not len(scores):
        return 0.5
    if rule == "pooled adult negatives":
        return specificity_threshold(scores, specificity)
    if rule == "archive-balanced pool":
        order = np.argsort(scores, kind="stable")
        counts = pd.Series(archives).value_counts()
        weights = 1.0 / counts.reindex(archives[order]).to_numpy(float)
        cumulative = np.cumsum(weights) / weights.sum()
        k = int(np.searchsorted(cumulative, specificity - 1e-9)) + 1
        return _threshold_above(scores[order], min(k, len(scores)))
    if rule == "worst archive":
        per = [specificity_threshold(scores[archives == a], specificity) for a in np.unique(archives)
               if (archives == a).sum() >= MIN_ARCHIVE_NEGATIVES]
        return max(per) if per else 0.5
    raise ValueError(f"unknown rule {rule!r}; choices: {list(TRANSFER_RULES)}")


def transfer_report(predictions: pd.DataFrame, specificity: float = TRANSFER_SPECIFICITY, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """Each rule of ``TRANSFER_RULES`` on the folds' out-of-archive predictions (columns uri,
    archive, held_out, is_covid, age_group, p_covid): its threshold from every archive, and what
    it does on an archive it did not see: for each archive, the threshold the rule picks from
    the other archives, and the archive's specificity (its films without COVID) and sensitivity
    there; pooled over archives, the specificity on adult films without COVID and the
    sensitivity on COVID films, with 95% bootstrap intervals (over images) and the counts. The
    chosen rule (``chosen``) has the highest pooled sensitivity among those whose pooled
    specificity is at least ``specificity`` - 0.02 (else the most specific), and why."""
    held = out_of_archive(predictions)
    score, archive = held["p_covid"].to_numpy(float), held["archive"].to_numpy(str)
    covid, negative = held["is_covid"].to_numpy(bool), adult_negatives(held)
    rules = {}
    for rule in TRANSFER_RULES:
        decided = np.zeros(len(held), bool)
        per_archive = {}
        for a in np.unique(archive):
            mine = archive == a
            t = transfer_threshold(rule, score[negative & ~mine], archive[negative & ~mine], specificity)
            decided[mine] = score[mine] >= t
            per_archive[str(a)] = {"threshold_without_it": t, "n_covid": int((mine & covid).sum()),
                                   "n_other": int((mine & ~covid).sum()),
                                   "n_adult_other": int((mine & negative).sum()),
                                   "sensitivity": share_interval(decided[mine & covid], n_boot, seed),
                                   "specificity": share_interval(~decided[mine & ~covid], n_boot, seed)}
        threshold = transfer_threshold(rule, score[negative], archive[negative], specificity)
        rules[rule] = {
            "threshold": threshold, "per_archive": per_archive,
            "pooled_unseen": {"specificity_adult_negatives": share_interval(~decided[negative], n_boot, seed),
                              "sensitivity_covid": share_interval(decided[covid], n_boot, seed)},
            "pooled_at_threshold": {"specificity_adult_negatives": share_interval(score[negative] < threshold, n_boot, seed),
                                    "sensitivity_covid": share_interval(score[covid] >= threshold, n_boot, seed)}}
    def value(rule: str, metric: str) -> float:        # a rate with no films behind it counts as 0
        rated = rules[rule]["pooled_unseen"][metric]
        return rated["value"] if rated else 0.0

    specific = [r for r in TRANSFER_RULES if value(r, "specificity_adult_negatives") >= specificity - 0.02]
    if specific:
        chosen = max(specific, key=lambda r: value(r, "sensitivity_covid"))
        why = (f"the highest pooled sensitivity on COVID-19 films of archives it did not see among the rules "
               f"keeping pooled specificity >= {specificity - 0.02:.2f} on adult films without COVID-19 there")
    else:
        chosen = max(TRANSFER_RULES, key=lambda r: value(r, "specificity_adult_negatives"))
        why = f"no rule kept pooled specificity >= {specificity - 0.02:.2f} on unseen archives: the most specific"
    return {"specificity": specificity, "rules": rules, "chosen": chosen, "why": why,
            "threshold": rules[chosen]["threshold"], "n_images": int(len(held)),
            "n_adult_negatives": int(negative.sum()), "n_covid": int(covid.sum())}


def _pct(metric: dict | None) -> str:
    if not metric:
        return "-"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}] (n={metric['n']})"


def transfer_table(report: dict) -> str:
    """Markdown: each rule's threshold and pooled figures on archives it did not see, then the
    chosen rule's per-archive figures."""
    lines = ["| rule | threshold (all archives) | pooled specificity, adult films without COVID-19 | "
             "pooled sensitivity, COVID-19 films | chosen |", "|---|---|---|---|---|"]
    for rule, r in report["rules"].items():
        p = r["pooled_unseen"]
        lines.append(f"| {rule} | {r['threshold']:.4f} | {_pct(p['specificity_adult_negatives'])} | "
                     f"{_pct(p['sensitivity_covid'])} | {'yes' if rule == report['chosen'] else ''} |")
    lines += ["", f"Rule `{report['chosen']}`, each archive at the threshold chosen without it:", "",
              "| archive | COVID / other (adult other) | threshold without it | sensitivity | specificity |",
              "|---|---|---|---|---|"]
    for a, r in report["rules"][report["chosen"]]["per_archive"].items():
        lines.append(f"| {a} | {r['n_covid']} / {r['n_other']} ({r['n_adult_other']}) | "
                     f"{r['threshold_without_it']:.4f} | {_pct(r['sensitivity'])} | {_pct(r['specificity'])} |")
    return "\n".join(lines)


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
