"""What a screen is judged on before it is promoted: the gate set, the screen's own figures on
it, and the evidence that its threshold transfers.

A gate must not be passable by a model that tells archives or ages apart (in the curated data
every child is from one archive, and most COVID-19 films from one collection). So:

- **The gate set** is the adult films (no child: the COVID question is asked of adults) of the
  ``archives`` task manifest that the candidate never learnt from: no film whose image or
  patient is in its training data (its card records both, ``DatasetDigest.images`` /
  ``patients``). Every film of an archive it never trained on is in; so are the held-out films
  of the archives it did train on, and the figures on the unseen archives alone are gated too. A candidate whose card does not record its training
  data cannot be checked against the set, and is refused.
- **The screen is judged as a site runs it**: decoded, QC'd and thresholded by ``Screen``, at
  its card's operating point. A film QC sets aside counts as not flagged: a COVID-19 film set
  aside is a missed one.
- **The threshold must have been shown to transfer**: the card's threshold must be the one
  ``cxr crossval --register`` chose on archives each fold never saw (or one a site fitted with
  ``cxr calibrate``), and those out-of-archive figures must hold the gates too. An edited
  threshold is refused by this check and, whatever the card says, by the figures on the set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr.card import ModelCard, patient_digest
from cxr.metrics import share_interval

THRESHOLD_TOLERANCE = 1e-6      # a threshold stored as float32 and read back as float64


class GateSetError(ValueError):
    """No gate set can be built for this candidate (its training data unknown, no films left)."""


class GateScoringError(RuntimeError):
    """A gate film could not be scored: the gate set or its storage is broken, not the candidate."""


@dataclass(frozen=True)
class TrainingSet:
    """What a model learnt from, from its card."""

    archives: frozenset[str]
    images: frozenset[str]
    patients: frozenset[str]

    @classmethod
    def of(cls, card: ModelCard) -> "TrainingSet":
        data = list(card.training_data)
        unrecorded = [d.name for d in data if d.archives is None or not d.images]
        if not data or unrecorded:
            raise GateSetError(f"its card does not record what it learnt from ({', '.join(unrecorded) or 'no data'}: "
                               "archives, images, patients): it cannot be checked against the gate set; "
                               "re-register it from a training run of this cxr")
        return cls(frozenset(a for d in data for a in d.archives), frozenset(i for d in data for i in d.images),
                   frozenset(p for d in data for p in d.patients))


def learnt_from(rows: pd.DataFrame, trained: TrainingSet) -> pd.Series:
    """Which rows' image or patient ``trained`` learnt from."""
    return rows["sha256"].isin(trained.images) | rows["patient_id"].map(patient_digest).isin(trained.patients)


def gate_rows(archives: pd.DataFrame, trained: TrainingSet) -> tuple[pd.DataFrame, dict]:
    """(the gate films, what was left out and why) for a candidate that learnt from ``trained``.
    Columns added: ``is_covid`` and ``unseen_archive`` (an archive it never trained on). A film
    of unknown age counts as an adult's (the Hannover films of the COVID collection carry none;
    every child here is Kermany's, whose age group is known)."""
    rows = archives[archives["label"].isin(["covid", "other"]) & (archives["age_group"] != "pediatric")].copy()
    rows["unseen_archive"] = ~rows["archive"].isin(trained.archives)
    learnt = learnt_from(rows, trained)
    gate = rows[~learnt].assign(is_covid=lambda f: f["label"] == "covid").reset_index(drop=True)
    summary = {
        "films": int(len(gate)), "covid": int(gate["is_covid"].sum()), "other": int((~gate["is_covid"]).sum()),
        "unseen_archives": sorted(gate.loc[gate["unseen_archive"], "archive"].unique().tolist()),
        "trained_archives_held_out": sorted(gate.loc[~gate["unseen_archive"], "archive"].unique().tolist()),
        "left_out_children": int((archives["age_group"] == "pediatric").sum()),
        "left_out_learnt_from": int(learnt.sum()),
        "per_archive": {a: {"covid": int(g["is_covid"].sum()), "other": int((~g["is_covid"]).sum()),
                            "unseen_archive": bool(g["unseen_archive"].iloc[0])}
                        for a, g in gate.groupby("archive")},
    }
    return gate, summary


def screen_outcomes(screen, gate: pd.DataFrame, storage=None, batch_size: int = 32) -> pd.DataFrame:
    """The screen's answer on every gate film, as a site gets it: ``flagged`` (screen-positive),
    ``screened`` (not set aside by QC, no error), ``covid_probability``."""
    scores = screen.predict(gate["uri"].tolist(), batch_size=batch_size, heatmap_size=0, storage=storage)
    if (scores["status"] == "error").any():
        bad = scores[scores["status"] == "error"].iloc[0]
        raise GateScoringError(f"{int((scores['status'] == 'error').sum())} gate films could not be scored "
                           f"(first: {bad['uri']}: {bad['error']})")
    return gate[["uri", "sha256", "patient_id", "archive", "is_covid", "unseen_archive"]].assign(
        flagged=scores["screen_positive"].eq(True).to_numpy(),
        screened=scores["screen_positive"].notna().to_numpy(),
        covid_probability=scores["covid_probability"].to_numpy(dtype=float))


def screen_figures(outcomes: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Sensitivity and specificity of the screen flag (95% bootstrap intervals and counts), on
    the whole gate set and on its archives the candidate never trained on; the share screened."""
    covid, other = outcomes["is_covid"], ~outcomes["is_covid"]
    unseen = outcomes["unseen_archive"]
    figures = {
        "sensitivity": share_interval(outcomes.loc[covid, "flagged"], n_boot, seed),
        "specificity": share_interval(~outcomes.loc[other, "flagged"], n_boot, seed),
        "sensitivity_unseen_archives": share_interval(outcomes.loc[covid & unseen, "flagged"], n_boot, seed),
        "specificity_unseen_archives": share_interval(~outcomes.loc[other & unseen, "flagged"], n_boot, seed),
        "screened": share_interval(outcomes["screened"], n_boot, seed),
        "balanced_accuracy": {"value": balanced_accuracy(outcomes)},
    }
    figures["per_archive"] = {a: {"n": int(len(g)), "flagged": float(g["flagged"].mean()),
                                  "screened": float(g["screened"].mean()), "covid": int(g["is_covid"].sum())}
                              for a, g in outcomes.groupby("archive")}
    return figures


def balanced_accuracy(outcomes: pd.DataFrame, idx: np.ndarray | None = None) -> float:
    """Mean of the screen flag's sensitivity and specificity (NaN without both kinds of film)."""
    o = outcomes if idx is None else outcomes.iloc[idx]
    covid, other = o["is_covid"].to_numpy(), ~o["is_covid"].to_numpy()
    if not covid.any() or not other.any():
        return float("nan")
    flagged = o["flagged"].to_numpy()
    return float((flagged[covid].mean() + (~flagged[other]).mean()) / 2)


def paired_difference(candidate: pd.DataFrame, champion: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """candidate - champion balanced accuracy on the same resamples of the same films, with its
    95% interval."""
    rng = np.random.default_rng(seed)
    n = len(candidate)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        draws.append(balanced_accuracy(candidate, idx) - balanced_accuracy(champion, idx))
    draws = np.asarray(draws, float)
    return {"value": balanced_accuracy(candidate) - balanced_accuracy(champion),
            "low": float(np.nanpercentile(draws, 2.5)), "high": float(np.nanpercentile(draws, 97.5))}


def transfer_evidence(card: ModelCard) -> dict:
    """Where the card's threshold comes from and what it was shown to do there: ``source``
    "cross-archive" (``cxr crossval --register``: the pooled figures on archives each fold
    never saw), "site calibration" (``cxr calibrate``), or None with ``why``."""
    op = card.operating_point
    if op is None or op.label != "covid":
        return {"source": None, "why": "its card has no COVID-19 operating point"}
    recorded = card.metrics.get("operating_point") if isinstance(card.metrics.get("operating_point"), dict) else {}
    calibration = card.metrics.get("calibration") if isinstance(card.metrics.get("calibration"), dict) else {}
    if _same(op.threshold, recorded.get("threshold")):
        pooled = ((recorded.get("rules") or {}).get(recorded.get("rule")) or {}).get("pooled_unseen") or {}
        return {"source": "cross-archive", "threshold": op.threshold, "rule": recorded.get("rule"),
                "specificity": pooled.get("specificity_adult_negatives"), "sensitivity": pooled.get("sensitivity_covid")}
    if _same(op.threshold, calibration.get("threshold")):
        return {"source": "site calibration", "threshold": op.threshold, "chosen_on": op.chosen_on}
    chosen = recorded.get("threshold", calibration.get("threshold"))
    why = (f"its card's threshold {op.threshold:.6g} is not the one chosen on archives it never saw "
           f"({chosen:.6g}): edited, or never shown to transfer" if chosen is not None else
           f"its card's threshold {op.threshold:.6g} was never shown to transfer (no cross-archive figures: "
           "register it with cxr crossval --register, or fit a site's with cxr calibrate)")
    return {"source": None, "threshold": op.threshold, "why": why}


def _same(a: float, b) -> bool:
    return b is not None and math.isfinite(float(b)) and abs(float(a) - float(b)) <= THRESHOLD_TOLERANCE


def judge(figures: dict, evidence: dict, rules: dict, difference: dict | None = None) -> tuple[list[dict], list[str]]:
    """(every gate with its figure and outcome, the reasons of those that fail). A gate holds on
    the lower end of its 95% interval; one on the unseen archives alone is judged where at
    least ``min_films`` such films exist (else it says so, and the whole set's gate decides)."""
    gates, failures = [], []
    min_films = int(rules.get("min_films", 10))
    for name, floor in (rules.get("gates") or {}).items():
        figure = figures.get(name)
        if figure is None or figure.get("n", 0) == 0 or (name.endswith("_unseen_archives") and figure["n"] < min_films):
            n = figure["n"] if figure else 0
            if name.endswith("_unseen_archives"):
                gates.append({"gate": name, "floor": floor, "n": n, "passed": None,
                              "note": f"not judged: {n} such films (fewer than {min_films})"})
                continue
            gates.append({"gate": name, "floor": floor, "n": n, "passed": False})
            failures.append(f"{name}: no film to judge it on")
            continue
        ok = bool(math.isfinite(figure["low"]) and figure["low"] >= floor)
        gates.append({"gate": name, "floor": floor, **figure, "passed": ok})
        if not ok:
            failures.append(f"{name} {figure['value']:.3f} (lower bound {figure['low']:.3f} < {floor}, n={figure['n']})")
    floors = rules.get("cross_archive") or {}
    if evidence["source"] is None:
        failures.insert(0, evidence["why"])
        gates.append({"gate": "threshold_transfers", "passed": False, "why": evidence["why"]})
    elif evidence["source"] == "cross-archive":
        for name, floor in floors.items():
            figure = evidence.get(name) or {}
            ok = bool(figure.get("low") is not None and figure["low"] >= floor)
            gates.append({"gate": f"cross_archive_{name}", "floor": floor, **figure, "passed": ok})
            if not ok:
                failures.append(f"out-of-archive {name} of its threshold "
                                + (f"{figure['value']:.3f} (lower bound {figure['low']:.3f} < {floor})"
                                   if figure else "not recorded"))
    else:
        gates.append({"gate": "threshold_transfers", "passed": True, "note": f"site-calibrated: {evidence['chosen_on']}"})
    ni = rules.get("non_inferiority")
    if difference is not None and ni:
        margin = float(ni["margin"])
        ok = bool(np.isfinite(difference["low"]) and difference["low"] >= -margin)
        gates.append({"gate": "non_inferiority", "metric": "balanced_accuracy", "margin": margin, **difference,
                      "passed": ok})
        if not ok:
            failures.append(f"balanced accuracy may be worse than the champion's by more than {margin} "
                            f"(candidate - champion {difference['value']:+.3f}, 95% CI "
                            f"[{difference['low']:+.3f}, {difference['high']:+.3f}])")
    return gates, failures


@dataclass
class Assessment:
    """A screen judged on its gate set: what the set was, the figures, the evidence, the gates."""

    gate_set: dict
    figures: dict
    evidence: dict
    outcomes: pd.DataFrame

    def to_dict(self) -> dict:
        return {"gate_set": self.gate_set, "figures": self.figures, "evidence": self.evidence}


def assess(screen, archives: pd.DataFrame, rules: dict, storage=None, gate: pd.DataFrame | None = None) -> Assessment:
    """The screen (``cxr.screen.Screen``) on its gate set from ``archives`` (or on ``gate``,
    already built: a champion is judged on the candidate's films, so the two are paired)."""
    summary = None
    if gate is None:
        gate, summary = gate_rows(archives, TrainingSet.of(screen.classifier.card))
        if gate.empty:
            raise GateSetError("no film of the gate set is one it never learnt from")
    outcomes = screen_outcomes(screen, gate, storage)
    n_boot, seed = int(rules.get("n_boot", 1000)), int(rules.get("seed", 0))
    return Assessment(summary or {}, screen_figures(outcomes, n_boot, seed), transfer_evidence(screen.classifier.card),
                      outcomes)
