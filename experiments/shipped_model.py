"""The screen shipped in ``models/cxr-screen`` on the shipped sample (what ``make demo`` scores):
what it predicts for each archive, its COVID AUROC and its rates at the card's threshold, each
with a 95% bootstrap interval; the same on the images it did not train on where its training
manifest is at hand; and, given the float32 original, what the int8 weights change.

    python -m experiments.shipped_model [--bundle models/cxr-screen] [--data data/sample]
        [--training-manifest out/crossval/screen/all-train.parquet] [--reference FLOAT32_BUNDLE]
        [--out docs/results/shipped-model.json]

The sample's images come from the archives the model was trained on, so these figures are
in-distribution at best; its figures on archives it never saw are the card's cross-archive table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.config import SAMPLE_DATA, REPO_ROOT, PrepareDataConfig, load_platform
from cxr.metrics import auroc_interval, screening_metrics

BUNDLE = REPO_ROOT / "models" / "cxr-screen"


def sample_rows(data_root: Path) -> pd.DataFrame:
    """The sample's labelled images: the screening task's manifest (every split)."""
    from cxr.workflows.data import prepare_manifests

    with tempfile.TemporaryDirectory() as tmp:
        prepare_manifests(PrepareDataConfig(data_root=str(data_root), out=tmp, threads=2), load_platform())
        return pd.read_parquet(Path(tmp) / "tasks" / "screen-4class.parquet")


def changed(a: pd.Series, b: pd.Series) -> int:
    """How many rows differ, a null equal to a null (a film neither version screened)."""
    return int((a.astype(object).where(a.notna(), "-") != b.astype(object).where(b.notna(), "-")).sum())


def figures(rows: pd.DataFrame, scored: pd.DataFrame, threshold: float, n_boot: int) -> dict:
    """Predicted labels per archive, COVID AUROC and the rates at ``threshold``."""
    is_covid = (rows["label"] == "covid").to_numpy()
    score = scored["covid_probability"].to_numpy(float)
    screened = scored["predicted_label"].notna().to_numpy()
    # Accuracy of the label rule's answer on the films it screened; the others (children and
    # what is not a frontal chest film) are counted apart.
    out = {"n": len(rows), "not_screened": int((~screened).sum()),
           "accuracy": float((scored["predicted_label"].to_numpy() == rows["label"].to_numpy())[screened].mean()),
           "predicted": {a: scored.loc[(rows["archive"] == a).to_numpy(), "predicted_label"].value_counts().to_dict()
                         for a in sorted(rows["archive"].unique())},
           "screen": screening_metrics(is_covid, score, threshold, n_boot)}
    if is_covid.any() and not is_covid.all():
        out["covid_auroc"] = auroc_interval(is_covid, score, n_boot)
    return out


def evaluate(bundle: Path, data_root: Path, training_manifest: str | None, reference: str | None,
             n_boot: int = 1000) -> dict:
    from cxr.screen import Screen

    screen = Screen.from_folder(bundle, "cpu")
    rows = sample_rows(data_root).reset_index(drop=True)
    scored = screen.predict(rows["uri"].tolist(), heatmap_size=None)
    if (scored["status"] == "error").any():
        raise RuntimeError(f"{int((scored['status'] == 'error').sum())} sample images failed to score")
    info = json.loads((bundle / "screen.json").read_text())
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bundle": str(bundle),
              "screen": info, "data": str(data_root), "threshold": screen.threshold,
              "temperature": screen.temperature, "all": figures(rows, scored, screen.threshold, n_boot)}
    if training_manifest:
        trained = set(pd.read_parquet(training_manifest)["sha256"])
        unseen = (~rows["sha256"].isin(trained)).to_numpy()
        result["in_training"] = int((~unseen).sum())
        if unseen.any():
            result["not_trained_on"] = figures(rows[unseen].reset_index(drop=True),
                                               scored[unseen].reset_index(drop=True), screen.threshold, n_boot)
    if reference:
        original = Screen.from_folder(Path(reference), "cpu").predict(rows["uri"].tolist(), heatmap_size=None)
        result["int8_against_float32"] = {
            "max_abs_covid_probability_difference": float(
                np.abs(original["covid_probability"] - scored["covid_probability"]).max()),
            "changed_labels": changed(original["predicted_label"], scored["predicted_label"]),
            "changed_screen_flags": changed(original["screen_positive"], scored["screen_positive"]),
            "changed_qc_flags": changed(original["qc_flags"].map(tuple), scored["qc_flags"].map(tuple)),
            "float32_figures": figures(rows, original, screen.threshold, n_boot)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(BUNDLE), help="the screen bundle (folder)")
    p.add_argument("--data", default=str(SAMPLE_DATA), help="data root to score (the shipped sample)")
    p.add_argument("--training-manifest", default=None, help="the model's training manifest (its card names it): "
                                                             "figures on the images it did not train on too")
    p.add_argument("--reference", default=None, help="the same screen exported in float32 (cxr export-model): what "
                                                     "int8 changes")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default="out/shipped-model.json", help="the JSON to write")
    args = p.parse_args(argv)
    result = evaluate(Path(args.bundle), Path(args.data), args.training_manifest, args.reference, args.n_boot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    for part in ("all", "not_trained_on"):
        if part in result:
            f = result[part]
            auroc = f.get("covid_auroc", {})
            print(f"{part}: n={f['n']} accuracy {f['accuracy']:.3f} COVID AUROC {auroc.get('value', float('nan')):.3f} "
                  f"sensitivity {f['screen']['sensitivity']['value']:.3f} specificity "
                  f"{f['screen']['specificity']['value']:.3f}; predicted {f['predicted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
