"""The operating point: a calibrating temperature, and the threshold rules that choose where a
screen says "COVID-19" (per archive, for a transfer to archives never seen, for a site's own
negatives), with the pooled out-of-archive report that judges them. Numpy, pandas and
scikit-learn on per-image predictions; ``cxr.crossval`` makes the folds whose predictions these
rules are chosen on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from cxr.metrics import ABOVE_ONE, float32_above, share_interval

MIN_ARCHIVE_NEGATIVES = 5    # a validation archive with fewer negatives joins the "small archives" group
SMALL = "(small archives)"

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
