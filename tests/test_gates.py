"""The gate set and the gate rules, without servers: what a candidate is judged on, and why a
degenerate, an edited or an unproven screen fails."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cxr.card import DatasetDigest, patient_digest
from cxr.gates import GateSetError, TrainingSet, gate_rows, judge, screen_figures, transfer_evidence
from tests.models import transfer_claim

RULES = {"gates": {"sensitivity": 0.5, "specificity": 0.75, "specificity_unseen_archives": 0.75, "screened": 0.8},
         "cross_archive": {"specificity": 0.85, "sensitivity": 0.6}, "min_films": 20}


def _archives() -> pd.DataFrame:
    rows = []
    for archive, label, age, n in (("kermany", "other", "pediatric", 30), ("covid/a", "covid", "adult", 30),
                                   ("covid/a", "other", "adult", 10), ("tbx", "other", "adult", 40),
                                   ("jsrt", "other", "adult", 20)):
        for i in range(n):
            rows.append({"uri": f"{archive}/{label}/{i}.jpg", "sha256": f"{archive}-{label}-{i}", "label": label,
                         "archive": archive, "age_group": age, "patient_id": f"{archive}:{label}:{i}",
                         "split": "test" if i % 5 == 0 else "train"})
    return pd.DataFrame(rows)


def test_gate_set_holds_only_adult_films_never_learnt_from():
    archives = _archives()
    learnt = archives[(archives["split"] == "train") & archives["archive"].isin(["covid/a", "jsrt"])]
    # One patient learnt from under another image: its other films are left out too.
    learnt = pd.concat([learnt, archives[archives["sha256"] == "tbx-other-3"].assign(sha256="another image",
                                                                                 archive="jsrt")])
    digest = DatasetDigest.of("t", "t.parquet", "0" * 64, len(learnt), learnt)
    gate, summary = gate_rows(archives, TrainingSet(frozenset(digest.archives), frozenset(digest.images),
                                                    frozenset(digest.patients)))
    assert "kermany" not in set(gate["archive"])                     # children: never
    assert not set(gate["sha256"]) & set(learnt["sha256"])
    assert "tbx-other-3" not in set(gate["sha256"])                  # its patient was learnt from
    assert set(gate.loc[gate["unseen_archive"], "archive"]) == {"tbx"}
    assert summary["unseen_archives"] == ["tbx"] and summary["covid"] == 6
    assert patient_digest("x") != "x" and len(patient_digest("x")) == 16


def test_a_card_that_does_not_say_what_it_learnt_from_cannot_be_gated():
    from tests.models import ELSEWHERE

    card = type("Card", (), {"training_data": (dataclasses.replace(ELSEWHERE, archives=None, images=()),)})()
    with pytest.raises(GateSetError, match="does not record what it learnt from"):
        TrainingSet.of(card)


def _outcomes(flag_covid: float, flag_other: float, n: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    is_covid = np.arange(n) < n // 2
    flagged = np.where(is_covid, rng.random(n) < flag_covid, rng.random(n) < flag_other)
    return pd.DataFrame({"uri": [str(i) for i in range(n)], "archive": np.where(is_covid, "covid/a", "tbx"),
                         "is_covid": is_covid, "unseen_archive": ~is_covid, "flagged": flagged,
                         "screened": True, "covid_probability": flagged.astype(float)})


def _card(threshold: float, metrics: dict):
    from cxr.card import OperatingPoint

    op = OperatingPoint(threshold, 0.9, "test")
    return type("Card", (), {"operating_point": op, "metrics": metrics})()


def test_a_good_screen_passes_and_degenerate_ones_fail():
    evidence = transfer_evidence(_card(0.5, transfer_claim(0.5)))
    assert evidence["source"] == "cross-archive"
    gates, failures = judge(screen_figures(_outcomes(0.9, 0.05), 200), evidence, RULES)
    assert not failures, failures
    for always in (1.0, 0.0):                                         # all-COVID, never-COVID
        _, failures = judge(screen_figures(_outcomes(always, always), 200), evidence, RULES)
        assert failures and any(("specificity" if always else "sensitivity") in f for f in failures)


def test_a_threshold_not_shown_to_transfer_fails():
    edited = transfer_evidence(_card(0.0001, transfer_claim(0.5)))
    assert edited["source"] is None and "not the one chosen on archives it never saw" in edited["why"]
    never = transfer_evidence(_card(0.5, {}))
    assert never["source"] is None and "never shown to transfer" in never["why"]
    _, failures = judge(screen_figures(_outcomes(0.9, 0.05), 200), edited, RULES)
    assert failures[0] == edited["why"]
    weak = transfer_evidence(_card(0.5, transfer_claim(0.5, specificity=0.7)))
    _, failures = judge(screen_figures(_outcomes(0.9, 0.05), 200), weak, RULES)
    assert failures == ["out-of-archive specificity of its threshold 0.700 (lower bound 0.680 < 0.85)"]
    site = _card(0.3, {**transfer_claim(0.5), "calibration": {"threshold": 0.3}})
    assert transfer_evidence(site)["source"] == "site calibration"
