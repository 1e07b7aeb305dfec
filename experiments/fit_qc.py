"""Fit a screen's quality control (``cxr.qc``), judge every flag on films its fit never saw, and
store it beside the classifier's weights in the bundle.

    python -m experiments.fit_qc --crossval out/crossval/screen --bundle models/cxr-screen --out docs/results/qc.json

It works from the features ``cxr crossval`` saved for each fold (``<fold>-features.npz``: the
fold classifier's features of its training and validation films, of the films it reports on,
of the lateral films and CT slices of ``external/views``, and of synthetic non-radiographs):

- **Thresholds chosen on archives never trained on**, like the screen's operating point: each
  learnt flag (lateral, CT slice, the view detector's and the non-radiograph detector's
  not-a-chest-X-ray, pediatric) flags its budget's share (``--view-false-flags``,
  ``--pediatric-false-flags``, ``--non-radiograph-false-flags``) of the adult films of every
  held-out archive, pooled, each scored by quality control fitted on its fold's films alone
  (views: their train and val split).
- **False flags on archives never trained on**: each held-out archive (the fold holding none
  out: TBX11K) at the thresholds chosen without it. Adult films, with and without COVID-19.
- **What blocking would cost**: the share of those COVID-19 films each flag stops.
- **Lateral films and CT slices**: the views' test split (patients no fit saw), by the fold
  holding none out. **Children**: Kermany's test split by the same fold (films it did not
  train on). **Non-radiographs**: files installed packages ship (photos, an MRI slice, maps,
  rendered text, noise, flat fields), through the bundle's classifier.
- **The shipped fit**: the bundle's own classifier (int8 where it is, as serving reads it; it
  must be the fold holding none out) on its training films, views train and val, and synthetic
  non-radiographs, with the chosen thresholds.

Writes ``qc.safetensors`` and ``qc.json`` into the bundle's ``classifier/`` and its checksums.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cxr.crossval import LABELS_4

from cxr.operating_point import specificity_threshold
from cxr.metrics import share_interval
from cxr.train.classifier_data import task_rows
from cxr.config import load_platform
from cxr.data.decode import decode_image
from cxr.data.storage import read_bytes
from cxr.qc import (BLOCKING, FLAGS, VIEW_CLASSES, QualityModel, classifier_features, fit_quality_model,
                    synthetic_non_radiographs)

def features(screen, grays: list[np.ndarray]) -> np.ndarray:
    """The classifier's pooled features of 8-bit grayscale images, letterboxed as the screen does."""
    boxed = np.stack([screen.preprocess.letterbox(g)[0] for g in grays])[:, None]
    return classifier_features(screen.classifier.model, boxed)


def manifest_grays(rows: pd.DataFrame, storage) -> list[np.ndarray]:
    return [decode_image(read_bytes(u, storage), u) for u in rows["uri"]]


def gray(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray((Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("L"), np.uint8)


def not_chest_xrays(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Images that are not chest X-rays, by kind, from files installed packages ship."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    data = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [gray(Image.open(data / "grace_hopper.jpg"))] + [gray(i) for i in load_sample_images().images]
    crops = [p[y:y + p.shape[0] // 2, x:x + p.shape[1] // 2] for p in photos
             for y, x in ((0, 0), (0, p.shape[1] // 2), (p.shape[0] // 2, 0), (p.shape[0] // 4, p.shape[1] // 4))]
    mri = np.frombuffer(gzip.open(data / "s1045.ima.gz").read(), ">u2").reshape(256, 256).astype(np.float32)
    mri = (255 * (mri - mri.min()) / (mri.max() - mri.min())).astype(np.uint8)
    maps = [np.load(data / "topobathy.npz")["topo"], np.load(data / "jacksboro_fault_dem.npz")["elevation"]]
    maps = [(255 * (m - m.min()) / (m.max() - m.min())).astype(np.uint8) for m in maps]
    graphics = [gray(Image.open(data / name)) for name in ("logo2.png", "Minduka_Present_Blue_Pack.png")]
    pages = []
    for i in range(20):
        page = Image.new("L", (600, 800), 255)
        draw = ImageDraw.Draw(page)
        for line in range(30):
            words = " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                             for _ in range(rng.integers(4, 10)))
            draw.text((40, 30 + 24 * line), words, fill=int(rng.integers(0, 80)))
        pages.append(np.asarray(page, np.uint8))
    noise = ([rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(10)]
             + [np.clip(rng.normal(128, s, (512, 512)), 0, 255).astype(np.uint8) for s in np.linspace(10, 80, 10)]
             + [np.where(rng.random((512, 512)) < 0.5, 0, 255).astype(np.uint8) for _ in range(5)])
    flat = ([np.full((512, 512), v, np.uint8) for v in (0, 128, 255)]
            + [np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1)),
               np.tile(np.linspace(0, 255, 512, dtype=np.uint8)[:, None], (1, 512))])
    return {"photo": photos + crops, "mri slice": [mri, mri[::-1], mri[:, ::-1], mri.T],
            "map or graphic": maps + graphics, "text page": pages, "noise": noise, "flat or gradient": flat}


def rate(hits) -> dict:
    """A share with its 95% bootstrap interval and count (value None where there is nothing)."""
    return share_interval(hits) or {"value": None, "n": 0}


def rates(flags: list[list[str]]) -> dict:
    """Any flag, and each flag, with intervals."""
    return {"any_flag": rate([bool(f) for f in flags]),
            **{flag: rate([flag in f for f in flags]) for flag in (*FLAGS, "no_lungs_found", "lung_fraction_out_of_range")
               if any(flag in f for f in flags)}}


def fold_inputs(folder: Path, name: str) -> dict:
    """A fold's saved features, its predictions (rows of ``evaluation``) and the age groups of
    its validation films (rebuilt from its training manifest as ``task_rows`` orders them)."""
    f = dict(np.load(folder / f"{name}-features.npz"))
    rows = task_rows(pd.read_parquet(folder / f"{name}-train.parquet"), LABELS_4)
    f["val_age_group"] = rows.loc[rows["split"] == "val", "age_group"].fillna("unknown").to_numpy(str)
    assert len(f["val_age_group"]) == len(f["val"]), "validation rows do not match the saved features"
    f["predictions"] = pd.read_parquet(folder / f"{name}.parquet")
    return f


def fit_fold(f: dict, **knobs) -> QualityModel:
    """Quality control from one fold's own films: training/validation films, the views' train
    and val split, synthetic non-radiographs; ``knobs`` go to ``fit_quality_model``."""
    fit_views = f["views_split"] != "test" if "views" in f else None
    ages = f["train_age_group"]
    return fit_quality_model(f["train"], f["val"], ages == "pediatric", np.isin(ages, ["pediatric", "adult"]),
                             f["synthetic"], f["views"][fit_views] if fit_views is not None else None,
                             f["views_kind"][fit_views] if fit_views is not None else None,
                             f["val_age_group"] == "adult", **knobs)


# The learnt flags whose thresholds are chosen on archives the folds never trained on, like the
# screen's operating point, and the probability each reads.
LEARNT = ("lateral", "ct_slice", "not_a_chest_xray", "pediatric", "non_radiograph")


def learnt_scores(qc: QualityModel, features: np.ndarray) -> pd.DataFrame:
    """Each learnt flag's probability (NaN where the fold's quality control has no such detector)."""
    views = qc.view_probabilities(features)
    child = qc.pediatric_probability(features)
    out = {flag: views[:, VIEW_CLASSES.index(flag)] if views is not None and flag in qc.view_thresholds
           else np.full(len(features), np.nan) for flag in LEARNT[:3]}
    out["pediatric"] = child if child is not None else np.full(len(features), np.nan)
    detector = qc.not_cxr_probability(features)      # the non-radiograph detector's own not_a_chest_xray
    out["non_radiograph"] = detector if detector is not None else np.full(len(features), np.nan)
    return pd.DataFrame(out)


def choose_thresholds(adults: pd.DataFrame, budgets: dict[str, float]) -> dict[str, float]:
    """Each learnt flag's threshold: the one flagging its budget's share of ``adults`` (adult
    films of archives the folds never trained on, pooled)."""
    return {flag: specificity_threshold(adults[flag].dropna().to_numpy(), 1 - budget) for flag, budget in budgets.items()}


def set_thresholds(qc: QualityModel, thresholds: dict[str, float]) -> QualityModel:
    qc.view_thresholds = {k: thresholds[k] for k in qc.view_thresholds}
    qc.pediatric_threshold = thresholds["pediatric"]
    qc.not_cxr_probability_threshold = thresholds["non_radiograph"]
    return qc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crossval", default="out/crossval/screen", help="a recipe's cxr crossval folder (with features)")
    p.add_argument("--bundle", default="models/cxr-screen", help="the screen bundle (folder), written in place; "
                                                                "its classifier must be the fold holding none out")
    p.add_argument("--manifests", default="out/manifests", help="cxr prepare-data output (views.parquet)")
    p.add_argument("--ood-quantile", type=float, default=0.999,
                   help="out_of_distribution above this quantile of the validation films' distance")
    p.add_argument("--false-flag-quantile", type=float, default=0.995,
                   help="each learnt flag's threshold: this share of the validation films stays under it")
    p.add_argument("--pediatric-false-flags", type=float, default=0.005,
                   help="the pediatric detector's share of flagged adult films of archives never trained on")
    p.add_argument("--view-false-flags", type=float, default=0.002,
                   help="each view flag's (lateral, ct_slice, not_a_chest_xray) share of flagged adult films of "
                        "archives never trained on")
    p.add_argument("--non-radiograph-false-flags", type=float, default=0.002,
                   help="the non-radiograph detector's share of flagged adult films of archives never trained on")
    p.add_argument("--out", default="out/qc.json")
    args = p.parse_args(argv)
    from cxr.package import read_screen, write_checksums
    from cxr.screen import Screen

    folder = Path(args.crossval)
    knobs = {"ood_quantile": args.ood_quantile, "false_flag_quantile": args.false_flag_quantile}
    budgets = {"lateral": args.view_false_flags, "ct_slice": args.view_false_flags,
               "not_a_chest_xray": args.view_false_flags, "pediatric": args.pediatric_false_flags,
               "non_radiograph": args.non_radiograph_false_flags}
    folds = {}
    for result in sorted(folder.glob("*.json")):
        if (folder / f"{result.stem}-features.npz").exists():
            f = fold_inputs(folder, result.stem)
            folds[result.stem] = (f, fit_fold(f, **knobs))
    if "all" not in folds:
        print(f"fit_qc: no fold holding none out (all-features.npz) in {folder}", file=sys.stderr)
        return 2
    scored = []
    for name, (f, qc) in folds.items():
        rows = f["predictions"].reset_index(drop=True)
        scored.append(pd.concat([rows.assign(fold=name), learnt_scores(qc, f["evaluation"])], axis=1)[rows["held_out"]])
    held = pd.concat(scored, ignore_index=True).drop_duplicates("uri")
    adults_scored = held[held["age_group"] == "adult"]
    chosen = choose_thresholds(adults_scored, budgets)
    # Nested: each archive's flags at the thresholds chosen without it (the honest figure).
    nested = []
    for name, (f, qc) in folds.items():
        rows = f["predictions"].reset_index(drop=True)
        for archive in rows.loc[rows["held_out"], "archive"].unique():
            mine = (rows["held_out"] & (rows["archive"] == archive)).to_numpy()
            without = choose_thresholds(adults_scored[adults_scored["archive"] != archive], budgets)
            flags = set_thresholds(qc, without).flags(f["evaluation"][mine])
            nested.append(rows[mine].assign(flags=flags, fold=name))
    held = pd.concat(nested, ignore_index=True).drop_duplicates("uri")
    adult = held[held["age_group"] == "adult"]
    f, qc = folds["all"]
    set_thresholds(qc, chosen)
    rows = f["predictions"].assign(flags=qc.flags(f["evaluation"]))
    views_test = f["views_split"] == "test"
    view_flags = qc.flags(f["views"][views_test])
    kinds = f["views_kind"][views_test]
    children = rows[(~rows["held_out"]) & (rows["archive"] == "kermany")]

    # The shipped fit reads the bundle's own classifier (int8 where it is), as serving will.
    screen = Screen(read_screen(Path(args.bundle))[0], None, "cpu")
    storage = load_platform().storage
    train_rows = task_rows(pd.read_parquet(folder / "all-train.parquet"), LABELS_4)
    views = pd.read_parquet(Path(args.manifests) / "views.parquet")
    views = views[views["split"] != "test"]
    print(f"fit_qc: the bundle's features of {len(train_rows)} training films and {len(views)} views", flush=True)
    grays = {split: manifest_grays(train_rows[train_rows["split"] == split], storage) for split in ("train", "val")}
    shipped_inputs = {"train": features(screen, grays["train"]), "val": features(screen, grays["val"]),
                      "train_age_group": train_rows.loc[train_rows["split"] == "train", "age_group"].fillna("unknown").to_numpy(str),
                      "val_age_group": train_rows.loc[train_rows["split"] == "val", "age_group"].fillna("unknown").to_numpy(str),
                      "synthetic": features(screen, list(synthetic_non_radiographs(screen.preprocess.size)[:, 0])),
                      "views": features(screen, manifest_grays(views, storage)),
                      "views_kind": views["view"].to_numpy(str), "views_split": views["split"].to_numpy(str)}
    shipped = set_thresholds(fit_fold(shipped_inputs, **knobs), chosen)
    others = {kind: shipped.flags(features(screen, grays)) for kind, grays in not_chest_xrays().items()}
    covid = adult[adult["is_covid"]]
    figures = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bundle": str(Path(args.bundle)),
        "crossval": str(folder), "knobs": knobs,
        "note": "false flags and blocking costs: each archive at the thresholds chosen without it",
        "false_flags_unseen_archives": {
            "adult_films": rates(list(adult["flags"])),
            "adult_films_without_covid": rates(list(adult.loc[~adult["is_covid"], "flags"])),
            "by_archive": {a: rates(list(g["flags"])) for a, g in adult.groupby("archive")}},
        # What each flag would cost in sensitivity if it stopped the screen: the share of
        # COVID-19 films of archives never trained on that it flags.
        "blocking_cost_on_unseen_covid_films": {
            "n": len(covid), "blocking_flags": sorted(BLOCKING),
            "by_flag": {flag: rate([flag in x for x in covid["flags"]]) for flag in FLAGS},
            "stopped_by_blocking_flags": rate([bool(set(x) & BLOCKING) for x in covid["flags"]]),
            "stopped_if_every_flag_blocked": rate([bool(x) for x in covid["flags"]])},
        "views_test_split": {kind: {**rates([v for v, k in zip(view_flags, kinds) if k == kind]),
                                    "caught_as_not_frontal": rate([bool(set(v) & BLOCKING)
                                                                   for v, k in zip(view_flags, kinds) if k == kind])}
                             for kind in ("lateral", "ct")},
        "thresholds_chosen_on_unseen_archives": {"budgets": budgets, "thresholds": chosen,
                                                 "n_adult_films": len(adults_scored)},
        "children_kermany_test": {"pediatric": rate(["pediatric" in x for x in children["flags"]]),
                                  "any_flag": rate([bool(x) for x in children["flags"]])},
        "not_chest_xrays": {"all": rate([bool(x) for v in others.values() for x in v]),
                            "by_kind": {k: rates(v) for k, v in others.items()}},
        "shipped_fit": {"train": len(shipped_inputs["train"]), "val": len(shipped_inputs["val"]),
                        "views": len(views), "synthetic": len(shipped_inputs["synthetic"]),
                        "thresholds": {"out_of_distribution": shipped.ood_threshold,
                                       "not_a_chest_xray_distance": shipped.not_cxr_threshold,
                                       "pediatric": shipped.pediatric_threshold,
                                       "non_radiograph_detector": shipped.not_cxr_probability_threshold,
                                       **shipped.view_thresholds}},
    }
    shipped.info = {"fitted_on": figures["shipped_fit"], "date": figures["date"],
                    "figures": "docs/results/qc.json of cxr (experiments/fit_qc.py)"}
    shipped.save(Path(args.bundle) / "classifier")
    write_checksums(Path(args.bundle))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    short = {k: figures[k] for k in ("false_flags_unseen_archives", "blocking_cost_on_unseen_covid_films",
                                     "views_test_split", "children_kermany_test")}
    print(json.dumps(short, indent=1)[:6000])
    print("not chest X-rays:", json.dumps(figures["not_chest_xrays"]["all"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
