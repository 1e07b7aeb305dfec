"""One answer per film: a row's label follows its screen result (``cxr.screen.screen_label_index``),
and the review page, the worklist and the SRs say the same; quality control's flags carry their
scores and thresholds, and only flags that say "not a frontal chest film" stop the screen."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

from cxr.qc import BLOCKING, VIEW_CLASSES, QualityModel, fit_quality_model
from cxr.screen import screen_label_index


def assert_one_answer(rows: pd.DataFrame, html: str | None = None, worklist: pd.DataFrame | None = None,
                      sr_results: list[dict] | None = None) -> None:
    """No row, page, worklist or SR shows a label and a screen result that disagree."""
    scored = rows[rows["status"].isin(["ok", "flagged"])]
    for r in scored.itertuples():
        if pd.isna(r.screen_positive):
            assert r.predicted_label is None or pd.isna(r.predicted_label), r
        else:
            assert (r.predicted_label == "covid") == bool(r.screen_positive), r
    if html is not None:
        for card in re.findall(r'<div class="card">(.*?)</div></div>', html, flags=re.S):
            assert ("screen-positive" in card) == ("predicted <b>covid</b>" in card), card[-400:]
    if worklist is not None:
        assert (worklist["predicted_label"] == "covid").all()
        assert set(worklist["uri"]) == set(scored.loc[scored["screen_positive"].fillna(False).astype(bool), "uri"])
    if sr_results is not None:
        by_sop = scored.dropna(subset=["sop_instance_uid"]).drop_duplicates("sop_instance_uid", keep="last")
        by_sop = by_sop.set_index("sop_instance_uid")
        for result in sr_results:
            row = by_sop.loc[result["sop_instance_uid"]]
            expected = None if pd.isna(row["screen_positive"]) else ("Positive" if row["screen_positive"] else "Negative")
            assert result["screen"] == expected
            assert (result["screen"] == "Positive") == (row["predicted_label"] == "covid")


def test_the_label_is_covid_exactly_at_or_above_the_operating_point():
    probs = np.array([[0.60, 0.30, 0.05, 0.05],     # argmax covid, under the threshold: the next class
                      [0.35, 0.40, 0.20, 0.05],     # argmax normal, at the threshold: covid
                      [0.20, 0.10, 0.60, 0.10],     # neither
                      [0.90, 0.05, 0.03, 0.02]])    # both
    assert screen_label_index(probs, 0, 0.7).tolist() == [1, 1, 2, 0]
    assert screen_label_index(probs, 0, 0.35).tolist() == [0, 0, 2, 0]
    # Without an operating point (or a COVID class), the most probable class.
    assert screen_label_index(probs, None, None).tolist() == [0, 1, 2, 0]
    assert screen_label_index(probs, 0, None).tolist() == [0, 1, 2, 0]


def test_screen_rows_follow_the_rule_at_any_threshold(tiny_models, sample_root):
    """The tiny screen's rows at a threshold below, inside and above its COVID probabilities:
    the label is covid exactly where the screen is positive, the argmax kept beside it, and the
    stored heatmap explains the label."""
    import cxr

    images = [str(p) for p in sorted((sample_root / "covid").rglob("*.jpg"))[:4]
              + sorted((sample_root / "kermany").rglob("*.jpg"))[:4]]
    screen = cxr.load(tiny_models["classifier_nomask"])
    screen.qc = None
    base = screen.predict(images, heatmap_size=16)
    p = np.sort(base["covid_probability"].to_numpy())
    argmax = base["argmax_label"].tolist()
    for threshold in (0.0, float((p[3] + p[4]) / 2), 1.01):
        screen.threshold = threshold
        rows = screen.predict(images, heatmap_size=16)
        assert_one_answer(rows)
        assert rows["argmax_label"].tolist() == argmax
        assert (rows["heatmap_label"] == rows["predicted_label"]).all()
        positive = rows["covid_probability"] >= threshold
        assert rows["screen_positive"].tolist() == positive.tolist()
    assert (rows["predicted_label"] != "covid").all()      # at 1.01 nothing is covid, whatever the argmax


def _clusters(rng, centre: float, n: int, d: int = 40) -> np.ndarray:
    return rng.normal(centre, 1.0, (n, d)) + rng.normal(0, 0.1, (1, d))


def test_quality_control_learns_views_and_keeps_frontal_films_with_scores_and_thresholds():
    rng = np.random.default_rng(0)
    frontal, val = _clusters(rng, 0.0, 300), _clusters(rng, 0.0, 100)
    lateral, ct, noise = _clusters(rng, 3.0, 40), _clusters(rng, -3.0, 40), rng.normal(0, 8, (30, 40))
    ages = np.array(["adult"] * 250 + ["pediatric"] * 50)
    frontal[250:] += 1.5                                   # children look a little different
    views = np.vstack([lateral[:30], ct[:30]])
    qc = fit_quality_model(frontal, val, ages == "pediatric", None, noise, views,
                           ["lateral"] * 30 + ["ct"] * 30, np.ones(len(val), bool), components=8,
                           false_flag_quantile=0.99)
    assert set(qc.view_thresholds) == {"lateral", "ct_slice", "not_a_chest_xray"}
    flags = qc.flags(np.vstack([lateral[30:], ct[30:]]))
    assert all(f == ["lateral"] for f in flags[:10]) and all(f == ["ct_slice"] for f in flags[10:])
    assert np.mean([bool(f) for f in qc.flags(_clusters(rng, 0.0, 200))]) <= 0.05
    assessed = qc.assess(lateral[30:])
    assert all(a[0]["score"] > a[0]["threshold"] for a in assessed)
    assert {f for a in qc.assess(frontal[250:]) for f in (x["flag"] for x in a)} <= {"pediatric", "out_of_distribution"}
    assert VIEW_CLASSES[0] == "frontal" and {"lateral", "ct_slice", "not_a_chest_xray"} <= BLOCKING


def test_quality_control_saves_and_loads_its_view_detector(tmp_path):
    rng = np.random.default_rng(1)
    qc = fit_quality_model(_clusters(rng, 0, 100), _clusters(rng, 0, 30), None, None, rng.normal(0, 8, (20, 40)),
                           _clusters(rng, 3, 20), ["lateral"] * 20, components=6)
    qc.save(tmp_path)
    back = QualityModel.load(tmp_path)
    x = np.vstack([_clusters(rng, 0, 5), _clusters(rng, 3, 5)])
    assert back.flags(x) == qc.flags(x)
    np.testing.assert_allclose([f["score"] for a in back.assess(x) for f in a],
                               [f["score"] for a in qc.assess(x) for f in a], rtol=1e-5)
    assert back.view_thresholds == qc.view_thresholds and "ct_slice" not in back.view_thresholds


def test_only_blocking_flags_stop_the_screen(tiny_models, sample_root):
    """A flag that says the film is not a frontal chest film leaves no screen result and no
    label; a review flag (out_of_distribution) keeps both. Flags come with their scores."""
    import cxr

    images = [str(p) for p in sorted((sample_root / "kermany").rglob("*.jpg"))[:4]]
    screen = cxr.load(tiny_models["classifier_nomask"])

    class Fixed:
        def __init__(self, flag):
            self.flag = flag

        def assess(self, features):
            return [[{"flag": self.flag, "score": 0.9, "threshold": 0.5}] for _ in range(len(features))]

        def signals(self, features):
            return {"distance": np.full(len(features), 0.9)}

    screen.qc = Fixed("out_of_distribution")
    review = screen.predict(images, heatmap_size=None)
    assert (review["status"] == "flagged").all() and review["screen_positive"].notna().all()
    assert review["predicted_label"].notna().all()
    assert review["qc_scores"][0] == [{"flag": "out_of_distribution", "score": 0.9, "threshold": 0.5}]
    for flag in ("lateral", "pediatric"):
        screen.qc = Fixed(flag)
        blocked = screen.predict(images, heatmap_size=None)
        assert blocked["screen_positive"].isna().all() and blocked["predicted_label"].isna().all()
        assert blocked["argmax_label"].notna().all()
    assert_one_answer(review)
    assert_one_answer(blocked)


def test_a_stated_dicom_age_decides_pediatric():
    from cxr.data.dicom_header import age_years
    from cxr.screen import with_age

    assert age_years("054Y") == 54 and age_years("006M") == 0.5 and age_years("") is None
    assert age_years("adult") is None and age_years(None) is None and abs(age_years("014D") - 14 / 365.25) < 1e-9
    learnt = [{"flag": "pediatric", "score": 0.9, "threshold": 0.7}]
    assert with_age(learnt, None) == learnt                          # no age: the detector decides
    assert with_age(learnt, "045Y") == []                            # an adult by the header
    assert with_age([], "004Y") == [{"flag": "pediatric", "score": 4.0, "threshold": 18.0}]
    lateral = [{"flag": "lateral", "score": 0.9, "threshold": 0.6}]
    assert with_age(lateral, "004Y") == lateral                      # not screened anyway
    assert with_age([{"flag": "out_of_distribution", "score": 3.0, "threshold": 2.0}], "004Y")[-1]["flag"] == "pediatric"


def test_a_child_s_dicom_is_not_screened_and_an_adult_s_overrides_the_detector(tiny_models):
    """Through ``predict``: the PatientAge of a DICOM's header decides ``pediatric``."""
    import pydicom

    import cxr
    from tests.inputs import real_gray, tagged_dicom

    def dicom(age: str) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(tagged_dicom(real_gray())))
        ds.PatientAge = age
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    screen = cxr.load(tiny_models["classifier_nomask"])

    class Child:                 # a detector that calls every film a child's
        def assess(self, features):
            return [[{"flag": "pediatric", "score": 0.99, "threshold": 0.9}] for _ in range(len(features))]

        def signals(self, features):
            return {"pediatric": np.full(len(features), 0.99)}

    screen.qc = Child()
    rows = screen.predict([dicom("006Y"), dicom("054Y"), dicom("²Y")], heatmap_size=None)
    assert rows["status"].tolist() == ["flagged", "ok", "flagged"]
    assert rows["qc_scores"][0] == [{"flag": "pediatric", "score": 6.0, "threshold": 18.0}]
    assert rows["screen_positive"][0] is None and rows["screen_positive"][1] is not None
    assert rows["qc_scores"][2][0]["score"] == 0.99          # an unreadable age: the detector decides
    assert_one_answer(rows)


def test_a_quality_control_file_from_before_the_view_detector_still_loads(tmp_path):
    """qc.json / qc.safetensors as cxr wrote them before schema 6 (no view detector, no
    standardisation): the PCA distance and the pediatric regression on the projection."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    train = _clusters(rng, 0, 60, d=12)
    old = fit_quality_model(train, train[:20], None, None, components=4)
    tensors = {"mean": old.mean, "components": old.components, "variance": old.variance,
               "pediatric_coef": np.ones(4)}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp_path / "qc.safetensors"))
    (tmp_path / "qc.json").write_text(json.dumps({
        "noise_variance": old.noise_variance, "ood_threshold": old.ood_threshold, "not_cxr_threshold": old.not_cxr_threshold,
        "pediatric_intercept": -100.0, "not_cxr_intercept": 0.0, "not_cxr_probability_threshold": 1.0, "info": {}}))
    back = QualityModel.load(tmp_path)
    assert back.view_coef is None and back.feature_scale is None and back.pediatric_threshold == 0.5
    flags = back.flags(np.vstack([train[:5], train[:1] * 50]))
    assert flags[:5] == [[]] * 5 and flags[5] == ["not_a_chest_xray"]
