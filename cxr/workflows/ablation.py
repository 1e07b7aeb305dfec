"""``cxr ablation``: the variants (each a set of finetune overrides), the runs over variants x
seeds, and the Markdown tables docs/RESULTS.md quotes (mean +- std over seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr.config import AblationConfig, FinetuneConfig, PlatformConfig, load_config

LABELS_4 = ["covid", "normal", "bacterial", "viral"]
LABELS_3 = ["covid", "normal", "pneumonia"]

# name -> (task manifest, classes, uses the pretraining run, lung masking)
VARIANTS: dict[str, tuple[str, list[str], bool, bool]] = {
    "paper-4class": ("dataset2-4class", LABELS_4, True, True),
    "paper-3class": ("dataset2-3class", LABELS_3, True, True),
    "scratch-4class": ("dataset2-4class", LABELS_4, False, True),
    "scratch-3class": ("dataset2-3class", LABELS_3, False, True),
    "nomask-4class": ("dataset2-4class", LABELS_4, True, False),
    "deconfounded-4class": ("deconfounded-4class", LABELS_4, True, True),
    # Tells the two readings of "no mask beats mask" apart: a shortcut through the source
    # (gone once adult negatives are added) vs the mask cutting away consolidated lung.
    "nomask-deconfounded-4class": ("deconfounded-4class", LABELS_4, True, False),
}


def check_variants(names) -> None:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choices: {sorted(VARIANTS)}")


def table(results: list[dict]) -> str:
    """Markdown: one row per variant, mean +- std over its seeds of the headline test metrics."""
    columns = [("accuracy", "accuracy"), ("f1_covid", "COVID F1"), ("covid_sensitivity", "COVID sens."),
               ("covid_specificity", "COVID spec."), ("auroc_macro", "macro AUROC")]
    lines = ["| variant | seeds | " + " | ".join(c for _, c in columns) + " | adult COVID sens. | adult COVID spec. | "
             "adult sens. at val threshold | adult spec. at val threshold |",
             "|---|---|" + "---|" * (len(columns) + 4)]
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]

        def stat(get) -> str:
            values = np.array([get(r) for r in runs], dtype=float)
            values = values[np.isfinite(values)]
            return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}" if len(values) else "n/a"

        cells = [stat(lambda r, k=k: r["report"]["metrics"][k]["value"]) for k, _ in columns]
        adult = [stat(lambda r, k=k: r["report"].get("adult", {}).get(k, {}).get("value", np.nan))
                 for k in ("covid_sensitivity", "covid_specificity")]
        # The operating point chosen on validation (cxr.evaluation.screening_threshold); runs
        # from before it existed have none.
        screened = [stat(lambda r, k=k: r["report"].get("screening", {}).get("adult", {}).get(k, {}).get("value", np.nan))
                    for k in ("sensitivity", "specificity")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells + adult + screened) + " |")
    return "\n".join(lines)


def per_class_table(results: list[dict], variant: str) -> str:
    """The paper's Tables 2-4 layout: per-class precision / recall / F1, mean +- std over seeds."""
    runs = [r for r in results if r["variant"] == variant]
    if not runs:
        return ""
    classes = runs[0]["report"]["classes"]
    lines = [f"| {variant} class | precision | recall | F1 |", "|---|---|---|---|"]
    for c in classes:
        cells = []
        for m in ("precision", "recall", "f1"):
            v = np.array([r["report"]["metrics"][f"{m}_{c}"]["value"] for r in runs], dtype=float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def within_table(results: list[dict]) -> str:
    """Markdown: each variant's COVID AUROC inside the subgroups its reports hold
    (``cxr.evaluation.covid_auroc_within``: one source archive, one view of adult films), mean
    +- std over seeds, with the counts. Empty when no report has any."""
    lines = []
    for name in dict.fromkeys(r["variant"] for r in results):
        within = [r["report"].get("covid_auroc_within", {}) for r in results if r["variant"] == name]
        for group in dict.fromkeys(g for w in within for g in w):
            found = [w[group] for w in within if group in w]
            values = np.array([v["value"] for v in found])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            lines.append(f"| {name} | {group} | {found[0]['n_positive']} vs {found[0]['n_negative']} | {len(found)} | "
                         f"{values.mean():.3f} ± {spread:.3f} | "
                         + ", ".join(f"[{v['low']:.2f}, {v['high']:.2f}]" for v in found) + " |")
    if not lines:
        return ""
    return "\n".join(["| variant | COVID vs rest within | COVID vs other images | seeds | AUROC | per-seed 95% intervals |",
                      "|---|---|---|---|---|---|", *lines])


def run_ablation(cfg: AblationConfig, platform: PlatformConfig) -> str:
    """Fine-tune each (variant, seed) not yet in OUT/results.json (resumable; Ray must be up),
    then write OUT/table.md; returns the tables."""
    from cxr.workflows.classifier import finetune

    check_variants(cfg.variants)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["variant"], r["seed"]) for r in results}
    for variant in cfg.variants:
        task, classes, pretrained, masked = VARIANTS[variant]
        for seed in cfg.seeds:
            if (variant, seed) in done:      # resumable: a rerun only runs what is missing
                continue
            # The variants are the paper-era recipes: no archive weights, the paper's augmentation.
            overrides = {"manifest": str(Path(cfg.manifests) / "tasks" / f"{task}.parquet"), "classes": classes,
                         "seed": seed, "pretrain_run": cfg.pretrain_run if pretrained else None,
                         "register": False, "run_name": f"ablation-{variant}-s{seed}",
                         "archive_balanced": False, "photometric": False}
            if not masked:
                overrides["segmenter"] = "none"
            r = finetune(load_config(FinetuneConfig, cfg.finetune_config, overrides), platform)
            results.append({"variant": variant, "seed": seed, "run_id": r["run_id"], "minutes": r["minutes"],
                            "report": r["report"]})
            results_file.write_text(json.dumps(results, indent=2))
    text = "\n\n".join(part for part in [table(results), within_table(results), *(
        per_class_table(results, v) for v in ("paper-4class", "paper-3class") if v in cfg.variants)] if part)
    (out / "table.md").write_text(text + "\n")
    return text
