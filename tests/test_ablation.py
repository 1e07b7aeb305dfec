"""``cxr ablation``'s summary: variants are checked by name, and the tables are mean +- std over seeds."""

import numpy as np
import pytest

from cxr.workflows.ablation import VARIANTS, check_variants, per_class_table, table, within_table


def run(variant: str, seed: int, accuracy: float, f1_covid: float) -> dict:
    metrics = {k: {"value": v} for k, v in {
        "accuracy": accuracy, "f1_covid": f1_covid, "covid_sensitivity": 0.9, "covid_specificity": 0.8,
        "auroc_macro": 0.95, "precision_covid": 1.0, "recall_covid": 0.9}.items()}
    return {"variant": variant, "seed": seed, "report": {
        "classes": ["covid"], "metrics": metrics, "adult": {"covid_sensitivity": {"value": 0.7}},
        "screening": {"threshold": 0.3, "adult": {"sensitivity": {"value": 0.91}, "specificity": {"value": 0.86}}}}}


def test_unknown_variants_fail_and_list_the_choices():
    check_variants(list(VARIANTS))
    with pytest.raises(ValueError, match="unknown variant.*nomask-5class.*choices"):
        check_variants(["paper-4class", "nomask-5class"])


def test_every_variant_names_a_task_prepare_data_writes():
    tasks = {"dataset2-4class", "dataset2-3class", "deconfounded-4class", "deconfounded-3class"}
    assert {task for task, *_ in VARIANTS.values()} <= tasks


def test_tables_give_mean_and_sample_std_over_seeds():
    results = [run("paper-4class", 0, 0.70, 0.90), run("paper-4class", 1, 0.80, 0.94), run("scratch-4class", 0, 0.6, 0.8)]
    lines = table(results).splitlines()
    paper = next(line for line in lines if line.startswith("| paper-4class"))
    assert f"0.750 ± {np.std([0.70, 0.80], ddof=1):.3f}" in paper and "| 2 |" in paper
    assert "0.700 ± 0.000" in paper                     # adult COVID sensitivity
    assert "n/a" in paper                               # adult specificity: not in these reports
    assert paper.endswith("| 0.910 ± 0.000 | 0.860 ± 0.000 |")   # at the validation-chosen threshold
    scratch = next(line for line in lines if line.startswith("| scratch-4class"))
    assert "0.600 ± 0.000" in scratch
    assert "| covid | 1.000 ± 0.000 | 0.900 ± 0.000 | 0.920 ± 0.028 |" in per_class_table(results, "paper-4class")


def test_within_table_lists_each_subgroup_with_its_counts_and_intervals():
    def within(value: float) -> dict:
        return {"source=covid": {"value": value, "low": value - 0.2, "high": value + 0.1, "n_positive": 60,
                                 "n_negative": 9}}

    results = [run("deconfounded-4class", s, 0.7, 0.8) for s in (0, 1)]
    results[0]["report"]["covid_auroc_within"], results[1]["report"]["covid_auroc_within"] = within(0.5), within(0.6)
    lines = within_table(results).splitlines()
    assert lines[2] == (f"| deconfounded-4class | source=covid | 60 vs 9 | 2 | 0.550 ± {np.std([0.5, 0.6], ddof=1):.3f} | "
                        "[0.30, 0.60], [0.40, 0.70] |")
    assert within_table([run("paper-4class", 0, 0.7, 0.8)]) == ""      # reports from before it existed
