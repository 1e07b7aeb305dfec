"""Leave-one-archive-out's pieces (cxr.crossval), the archive of every manifest row, and the
training knobs the screening recipe adds (archive weights, photometric augmentation)."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxr.crossval import (ALL, RECIPES, archive_report, archive_table, check_recipes, fold_evaluation, fold_task,
                          plan_folds, recipe_summary, shortfall)

from cxr.operating_point import (SMALL, calibrated, fit_temperature, local_negatives_curve, local_threshold,
                                 rule_threshold, specificity_threshold, temperature_at_bound, worst_archive_threshold)
from cxr.data.augment import photometric_augment_batch
from cxr.data.manifest import covid_archive
from cxr.data.tasks import is_covid
from cxr.train.classifier import weighted_loss
from cxr.train.classifier_data import archive_weights


def test_covid_collection_origins_come_from_the_url_host():
    hannover = "https://github.com/ml-workgroup/covid-19-image-repository/tree/master/png"
    assert covid_archive(hannover) == "covid/hannover"
    assert covid_archive("https://radiopaedia.org/cases/covid-19-pneumonia-12") == "covid/radiopaedia"
    assert covid_archive("https://www.sirm.org/2020/03/10/covid-19-caso-19/") == "covid/sirm"
    assert covid_archive("https://www.eurorad.org/case/16664") == "covid/eurorad"
    assert covid_archive("https://pubs.rsna.org/doi/10.1148/radiol.2020200432") == "covid/literature"
    assert covid_archive("") == "covid/literature"


def test_every_manifest_row_has_an_archive(sample_manifests):
    for name in ("kermany", "covid", "lungseg", "tasks/screen-4class", "tasks/archives"):
        frame = pd.read_parquet(sample_manifests / f"{name}.parquet")
        assert frame["archive"].notna().all(), name
    archives = pd.read_parquet(sample_manifests / "tasks" / "archives.parquet")
    assert set(archives["label"]) == {"covid", "other"}
    assert not (archives["source"] == "kermany/train").any()          # what every recipe pretrains on
    assert (archives.loc[archives["label"] == "covid", "source"] == "covid").all()


def test_covid_truth_is_unknown_for_unlabelled_rows():
    frame = pd.DataFrame({"source": ["covid", "covid", "covid", "shenzhen"],
                          "finding": ["COVID-19, ARDS", "todo", "SARS", "tuberculosis"]})
    assert is_covid(frame).tolist() == [True, pd.NA, False, False]


def test_the_external_archives_join_the_tasks_and_keep_every_other_split(full_data_root, tmp_path):
    from cxr.data.tasks import base_manifests, split_and_build_tasks

    bases = {k: v.assign(sha256=v["uri"]) for k, v in base_manifests(full_data_root).items()}
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    with_external = split_and_build_tasks(bases, 1234, fractions, 0.1)
    without = split_and_build_tasks({k: bases[k] for k in ("kermany", "covid", "lungseg")}, 1234, fractions, 0.1)
    for name in ("tasks/dataset2-4class", "tasks/deconfounded-4class", "lungseg"):
        assert with_external[name]["split"].tolist() == without[name]["split"].tolist(), name
    archives = with_external["tasks/archives"]
    assert {"jsrt", "tbx11k"} <= set(archives["archive"])
    assert (archives.query("archive == 'tbx11k'")["label"] == "other").all()
    screen = with_external["tasks/screen-4class"]
    assert set(screen.query("archive == 'jsrt'")["finding"]) == {"no nodule"}


def tiny_task() -> pd.DataFrame:
    rows = []
    for archive, labels in {"a": ["covid"] * 10 + ["normal"] * 10, "b": ["normal"] * 30, "c": ["covid"] * 8}.items():
        for i, label in enumerate(labels):
            rows.append({"uri": f"{archive}{i}", "archive": archive, "label": label,
                         "split": ["train", "train", "val", "test"][i % 4]})
    return pd.DataFrame(rows)


def test_folds_hold_out_archives_that_leave_both_classes_to_train_on():
    task = tiny_task()
    assert plan_folds(task, min_images=5) == ["b", "a", "c", ALL]
    assert plan_folds(task.query("archive != 'c'"), min_images=5) == ["b", ALL]   # without a: no COVID left
    fold = fold_task(task, "a")
    assert "a" not in set(fold["archive"]) and "test" not in set(fold["split"])


def test_fold_evaluation_is_the_whole_held_out_archive_or_what_no_fold_trained_on():
    task = tiny_task()
    universe = pd.concat([task, pd.DataFrame({"uri": ["d0", "d1"], "archive": "d", "label": "other", "split": "test"})])
    held = fold_evaluation(universe, task, "a")
    assert set(held["archive"]) == {"a"} and len(held) == 20 and held["held_out"].all()
    rest = fold_evaluation(universe, task, ALL)
    assert set(rest.loc[rest["held_out"], "archive"]) == {"d"}
    assert set(rest.loc[~rest["held_out"], "split"]) == {"test"}         # in-distribution, for comparison


def test_specificity_thresholds_hold_their_promise():
    neg = np.random.default_rng(0).random(200)
    for s in (0.5, 0.85, 0.9):
        t = specificity_threshold(neg, s)
        assert (neg < t).mean() >= s and (neg < np.nextafter(t, -1) - 1e-9).mean() < s + 1 / 200 + 1e-9
    assert local_threshold(neg, 0.9) >= specificity_threshold(neg, 0.9)     # conformal: one order statistic up


def test_the_worst_archive_sets_the_threshold():
    is_pos = np.r_[np.zeros(20, bool), np.ones(5, bool)]
    score = np.r_[np.linspace(0, 0.5, 10), np.linspace(0.5, 0.9, 10), np.full(5, 0.95)]
    archives = np.r_[["quiet"] * 10, ["loud"] * 10, ["x"] * 5]
    threshold, per = worst_archive_threshold(is_pos, score, archives, 0.9)
    assert threshold == per["loud"] > per["quiet"]
    for name in ("quiet", "loud"):
        assert (score[archives == name] < threshold).mean() >= 0.9


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4))
    probs = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)
    targets = np.array([rng.choice(4, p=p) for p in probs])
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    t = fit_temperature(log_probs, targets)
    assert t == pytest.approx(2.0, rel=0.1) and not temperature_at_bound(t)
    assert temperature_at_bound(np.exp(-3)) and temperature_at_bound(np.exp(3))
    assert np.allclose(calibrated(log_probs, t).sum(1), 1)


def test_the_local_negatives_curve_reaches_the_target_as_the_sample_grows():
    neg, pos = np.random.default_rng(1).beta(2, 5, 2000), np.random.default_rng(2).beta(5, 2, 500)
    curve = local_negatives_curve(neg, [10, 50, 400], 0.9, repeats=100, positives=pos)
    assert [c["n"] for c in curve] == [10, 50, 400]
    assert all(c["specificity_mean"] >= 0.88 for c in curve)
    assert curve[-1]["specificity_p05"] > curve[0]["specificity_p05"]      # more negatives, less spread
    assert 0 < curve[-1]["sensitivity_mean"] < 1


def test_archive_table_sorts_the_worst_first_and_marks_the_goal():
    def report(sens=None, spec=None):
        r = {"n_covid": 10 if sens else 0, "n_other": 10 if spec else 0}
        if sens:
            r["sensitivity"] = {"value": sens, "low": sens - .1, "high": sens + .05}
        if spec:
            r["specificity"] = {"value": spec, "low": spec - .1, "high": spec + .05}
        return r
    results = [{"recipe": "screen", "archive": "good", "fold": "yes", "report": report(sens=0.95)},
               {"recipe": "screen", "archive": "bad", "fold": "yes", "report": report(spec=0.40)},
               {"recipe": "screen", "archive": "meh", "fold": "yes", "report": report(sens=0.85, spec=0.9)}]
    summary = recipe_summary([dict(r, rule="pooled") for r in results]).splitlines()[2]
    assert summary == "| screen | pooled | nan (0) | 0.85 | 0.40 | 1 of 3 |"
    lines = archive_table(results).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["bad", "meh", "good"]
    assert lines[0].endswith("| no |") and lines[2].endswith("| yes |")
    assert shortfall(report(sens=0.9, spec=0.85)) == pytest.approx(0)


def test_archive_report_has_auroc_only_with_both_classes():
    rows = pd.DataFrame({"is_covid": [True, True, False, False] * 5, "p_covid": [0.9, 0.4, 0.3, 0.6] * 5})
    rep = archive_report(rows, 0.5, n_boot=50)
    assert rep["auroc"]["value"] == 0.75 and rep["sensitivity"]["value"] == 0.5 and rep["specificity"]["value"] == 0.5
    assert "auroc" not in archive_report(rows[~rows["is_covid"]], 0.5, n_boot=20)
    four_negatives = pd.concat([rows[rows["is_covid"]], rows[~rows["is_covid"]].head(4)])
    assert "auroc" not in archive_report(four_negatives, 0.5, n_boot=20)


def test_unknown_recipes_fail_and_every_recipe_names_a_task():
    with pytest.raises(ValueError, match="choices"):
        check_recipes(["nope"])
    assert {r["task"] for r in RECIPES.values()} <= {"dataset2-4class", "deconfounded-4class", "screen-4class"}


def test_archive_weights_make_every_archive_weigh_the_same():
    rows = pd.DataFrame({"uri": list("abcdef"), "archive": ["big"] * 4 + ["small"] * 2, "split": "train"})
    w = archive_weights(rows)
    assert w[:4].sum() == pytest.approx(w[4:].sum()) and w.mean() == pytest.approx(1)
    with pytest.raises(ValueError, match="archive"):
        archive_weights(rows.drop(columns="archive"))


def test_weighted_loss_with_equal_weights_is_cross_entropy():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 1])
    cw = torch.tensor([0.5, 1.0, 2.0])
    criterion = nn.CrossEntropyLoss(weight=cw, reduction="none")
    expected = nn.CrossEntropyLoss(weight=cw)(logits, labels)
    assert torch.allclose(weighted_loss(criterion, logits, labels, torch.ones(6)), expected)
    heavy = torch.tensor([10.0, 1, 1, 1, 1, 1])
    assert not torch.allclose(weighted_loss(criterion, logits, labels, heavy), expected)


def test_photometric_augmentation_changes_style_per_image_and_stays_in_range():
    x = torch.linspace(0, 255, 32 * 32).view(1, 1, 32, 32).repeat(4, 1, 1, 1)
    out = photometric_augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out[0], out[1])
    same = photometric_augment_batch(x, gamma=(1, 1), max_sharpen=0, max_noise=0,
                                     generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(same, x)        # the blur side of [-1, 0] still draws


def test_the_negative_archives_rule_ignores_archives_with_covid():
    is_pos = np.r_[np.zeros(20, bool), np.ones(5, bool)]
    score = np.r_[np.linspace(0, 0.5, 10), np.linspace(0.5, 0.9, 10), np.full(5, 0.95)]
    archives = np.r_[["routine"] * 10, ["covid-site"] * 10, ["covid-site"] * 5]
    worst, per = worst_archive_threshold(is_pos, score, archives, 0.9)
    negative_only = rule_threshold(per, set(archives[is_pos]) | {SMALL})
    assert worst == per["covid-site"] > negative_only == per["routine"]
    assert rule_threshold(per, {"covid-site", "routine"}) == 0.5          # nothing left: the neutral threshold


def test_thresholds_hold_in_float32_where_serving_compares_them():
    top = np.array([0.2, 0.3, 1.0, 1.0], np.float32)
    assert not (top >= specificity_threshold(top, 0.9)).any()            # above every score, 1.0 included
    v = np.float32(0.99)
    adjacent = np.array([0.1] * 8 + [v, np.nextafter(v, np.float32(1))], np.float32)
    assert (adjacent < specificity_threshold(adjacent, 0.9)).mean() == 0.9
    rng = np.random.default_rng(0)
    for _ in range(300):
        neg = np.round(rng.random(rng.integers(2, 40)), int(rng.integers(2, 7))).astype(np.float32)
        t = specificity_threshold(neg, 0.9)
        assert (neg < t).mean() >= 0.9 and (neg < t).mean() == (neg.astype(float) < t).mean()


def _held_out_predictions(seed: int = 0) -> pd.DataFrame:
    """Out-of-archive predictions: a large archive of adult negatives scoring low, a small
    COVID-collection archive whose few negatives score as high as its COVID films, children."""
    rng = np.random.default_rng(seed)
    parts = [("tbx11k", False, "adult", rng.uniform(0.0, 0.5, 600)),
             ("shenzhen", False, "adult", rng.uniform(0.0, 0.6, 300)),
             ("covid/eurorad", False, "adult", rng.uniform(0.8, 1.0, 30)),
             ("covid/eurorad", True, "adult", rng.uniform(0.8, 1.0, 30)),
             ("covid/sirm", True, "adult", rng.uniform(0.55, 1.0, 50)),
             ("kermany", False, "pediatric", rng.uniform(0.0, 0.3, 100))]
    frames = [pd.DataFrame({"archive": a, "is_covid": c, "age_group": g, "p_covid": p}) for a, c, g, p in parts]
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(uri=[f"u{i}" for i in range(len(frame))], held_out=True)


def test_the_transfer_rules_pool_adult_negatives_and_a_small_archive_does_not_set_the_point():
    from cxr.operating_point import transfer_report, transfer_threshold

    rows = _held_out_predictions()
    report = transfer_report(rows, 0.90, n_boot=50)
    pooled = report["rules"]["pooled adult negatives"]
    negatives = rows[(~rows["is_covid"]) & (rows["age_group"] == "adult")]
    # The pooled threshold keeps 90% of every adult negative film (children are not in the pool).
    assert (negatives["p_covid"] < pooled["threshold"]).mean() >= 0.90
    assert report["n_adult_negatives"] == len(negatives) and report["n_covid"] == 80
    # The worst-archive rule lets Eurorad's 30 negatives set the point, and loses the COVID films.
    worst = report["rules"]["worst archive"]
    assert worst["threshold"] > 0.95 > pooled["threshold"]
    assert worst["pooled_unseen"]["sensitivity_covid"]["value"] < 0.5
    assert report["chosen"] != "worst archive"
    # The nested figures: each archive at the threshold chosen from the other archives alone.
    eurorad = pooled["per_archive"]["covid/eurorad"]
    without = transfer_threshold("pooled adult negatives", negatives.loc[negatives["archive"] != "covid/eurorad", "p_covid"],
                                 negatives.loc[negatives["archive"] != "covid/eurorad", "archive"], 0.90)
    assert eurorad["threshold_without_it"] == without and eurorad["n_covid"] == 30 and eurorad["n_adult_other"] == 30
    films = rows[rows["archive"] == "covid/eurorad"]
    assert eurorad["sensitivity"]["value"] == (films.loc[films["is_covid"], "p_covid"] >= without).mean()
    assert eurorad["specificity"]["value"] == (films.loc[~films["is_covid"], "p_covid"] < without).mean()
    assert without < pooled["threshold"]     # judged without its own negatives: another point than the global one
    # Archive-balanced: each archive weighs the same, so Eurorad's high negatives pull it up.
    balanced = report["rules"]["archive-balanced pool"]["threshold"]
    assert balanced > pooled["threshold"]


def test_the_card_keeps_the_chosen_rule_with_its_figures_and_counts():
    from cxr.operating_point import transfer_report, transfer_table
    from cxr.workflows.crossval import card_operating_point

    report = transfer_report(_held_out_predictions(), 0.90, n_boot=50)
    card = card_operating_point(report)
    assert card["rule"] == report["chosen"] and card["threshold"] == report["threshold"]
    assert set(card["rules"]) == {"pooled adult negatives", "archive-balanced pool", "worst archive"}
    assert card["per_archive"]["tbx11k"]["specificity"]["n"] == 600
    table = transfer_table(report)
    assert "| worst archive |" in table and "covid/sirm" in table


def test_the_markdown_card_shows_the_transfer_rule_and_its_figures():
    import dataclasses

    from cxr.operating_point import transfer_report
    from cxr.model_card import model_markdown
    from cxr.workflows.crossval import card_operating_point
    from tests.test_card import classifier_card

    op = card_operating_point(transfer_report(_held_out_predictions(), 0.90, n_boot=50))
    card = classifier_card()
    card = dataclasses.replace(card, metrics={**card.metrics, "operating_point": op}).validate()
    text = model_markdown(card)
    assert f"(rule: {op['rule']})" in text and "| archive-balanced pool |" in text
    assert "| covid/sirm | 50 / 0 |" in text and "nan" not in text.lower()


def test_the_rules_stand_without_negatives_or_covid_films():
    from cxr.operating_point import transfer_report

    rows = _held_out_predictions()
    only_one = rows[(rows["archive"] == "tbx11k") | rows["is_covid"]]        # every negative in one archive
    report = transfer_report(only_one, 0.90, n_boot=20)
    assert report["rules"]["archive-balanced pool"]["per_archive"]["tbx11k"]["threshold_without_it"] == 0.5
    no_covid = transfer_report(rows[~rows["is_covid"]], 0.90, n_boot=20)
    assert no_covid["chosen"] in no_covid["rules"] and no_covid["n_covid"] == 0
