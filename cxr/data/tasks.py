"""The paper's task sets, and the de-confounded variant, built from the curated manifests.

- ``source``: kermany/train, 3 classes, split train/val (pretraining).
- ``dataset2-4class`` / ``dataset2-3class``: kermany/test + COVID-19 X-rays (the paper's
  dataset II), split train/val/test.
- ``deconfounded-4class`` / ``-3class``: dataset II plus adult negatives (lungseg normals,
  "No Finding" and non-COVID pneumonias from the COVID collection), because in dataset II every
  non-COVID image is pediatric and every COVID image is adult.
- ``screen-4class``: the screening champion's task: the de-confounded set plus JSRT's films
  without a nodule as adult normals, so its negatives come from every archive with a 4-class label.
- ``archives``: the cross-archive evaluation set (``cxr crossval``): every image whose COVID
  status is known, from every archive, ``label`` covid or other (tuberculosis and nodule films
  included: a screen must leave them negative). Kermany's train folder is left out: it is
  what every recipe pretrains on.

One split is drawn over the union of kermany/test, covid and lungseg, so every task and the
segmenter's lungseg split agree: an image is in the same split wherever it appears. The
external archives (JSRT, TBX11K; absent from the shipped sample) get their own split with the
same fractions, so adding them left every other image's split as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from cxr.data.manifest import (covid_manifest, jsrt_manifest, kermany_manifest, lungseg_manifest, tbx11k_manifest,
                               views_manifest)
from cxr.data.splits import assign_splits

LABELS_4 = ("covid", "normal", "bacterial", "viral")
LABELS_3 = ("covid", "normal", "pneumonia")
TO_3CLASS = {"covid": "covid", "normal": "normal", "bacterial": "pneumonia", "viral": "pneumonia"}

# Non-COVID findings of the COVID collection that map cleanly onto the 4 classes. Fungal
# (Pneumocystis), lipoid, ARDS, unspecified "Pneumonia" and unlabelled ("todo") are left out.
COVID_COLLECTION_LABELS = {
    "No Finding": "normal",
    "Streptococcus": "bacterial", "Klebsiella": "bacterial", "E.Coli": "bacterial",
    "Mycoplasma Bacterial Pneumonia": "bacterial", "Legionella": "bacterial", "Bacterial": "bacterial",
    "SARS": "viral", "Influenza": "viral", "Varicella": "viral", "MERS": "viral",
}


def covid_collection_label(finding: str) -> str | None:
    """4-class label of a COVID-collection finding; findings starting with "COVID-19" are covid."""
    if finding.startswith("COVID-19"):
        return "covid"
    return COVID_COLLECTION_LABELS.get(finding)


def base_manifests(root: Path) -> dict[str, pd.DataFrame]:
    kermany = kermany_manifest(root)
    covid = covid_manifest(root)
    covid["label"] = covid["finding"].map(covid_collection_label)
    lungseg = lungseg_manifest(root)
    lungseg["label"] = lungseg["finding"]
    bases = {"kermany": kermany, "covid": covid, "lungseg": lungseg}
    if (root / "external" / "jsrt").is_dir():
        bases["jsrt"] = jsrt_manifest(root).assign(split=None, label=None)
    if (root / "external" / "tbx11k").is_dir():
        bases["tbx11k"] = tbx11k_manifest(root)
    if (root / "external" / "views").is_dir():
        bases["views"] = views_manifest(root)
    return bases


def is_covid(frame: pd.DataFrame) -> pd.Series:
    """COVID-19 truth per row: True, False, or NA where unknown (the COVID collection's
    unlabelled "todo" rows). Only the COVID collection holds COVID-19 images."""
    covid_source = frame["source"] == "covid"
    truth = pd.Series(False, index=frame.index, dtype="boolean")
    truth[covid_source] = frame.loc[covid_source, "finding"].str.startswith("COVID-19")
    truth[covid_source & (frame["finding"] == "todo")] = pd.NA
    return truth


def split_and_build_tasks(bases: Mapping[str, pd.DataFrame], seed: int, fractions: Mapping[str, float],
                          source_val_fraction: float, exclude_shared_patients: bool = True) -> dict[str, pd.DataFrame]:
    """Assign splits to the base manifests (which must have ``sha256``) and derive the tasks.

    Kermany's train and test folders share 170 patient ids (457 train images, all pneumonia).
    Whether they are the same children cannot be told from the data, so by default those train
    images are left out of pretraining (split null): otherwise the pretrained backbone may have
    seen dataset II's test patients.
    """
    kermany, covid, lungseg = bases["kermany"].copy(), bases["covid"].copy(), bases["lungseg"].copy()
    external = [bases[name].copy() for name in ("jsrt", "tbx11k") if name in bases]

    source = kermany[kermany["source"] == "kermany/train"].copy()
    if exclude_shared_patients:
        test_patients = set(kermany.loc[kermany["source"] == "kermany/test", "patient_id"])
        source = source[~source["patient_id"].isin(test_patients)].copy()
    source["split"] = assign_splits(source, {"train": 1 - source_val_fraction, "val": source_val_fraction}, seed)

    universe = pd.concat([kermany[kermany["source"] == "kermany/test"], covid, lungseg], ignore_index=True)
    strata = universe["label"].fillna(universe["source"] + ":" + universe["finding"]) + "|" + universe["age_group"]
    universe["split"] = assign_splits(universe.assign(stratum=strata), fractions, seed, stratify="stratum")
    split_of = dict(zip(universe["uri"], universe["split"]))
    split_of.update(zip(source["uri"], source["split"]))
    for frame in external:
        strata = frame["archive"] + ":" + frame["finding"]
        splits = assign_splits(frame.assign(stratum=strata), fractions, seed, stratify="stratum")
        split_of.update(zip(frame["uri"], splits))
    for frame in (kermany, covid, lungseg, *external):
        frame["split"] = frame["uri"].map(split_of).astype(object)
        frame.loc[frame["split"].isna(), "split"] = None
    views = bases["views"].copy() if "views" in bases else None
    if views is not None:
        # A patient's lateral films and CT slices take the split of their frontal films, so
        # that nothing learnt from one side is tested on the same patient; the rest get their own.
        patient_split = covid.dropna(subset=["split"]).drop_duplicates("patient_id").set_index("patient_id")["split"]
        own = assign_splits(views.assign(stratum=views["view"]), fractions, seed, stratify="stratum")
        views["split"] = views["patient_id"].map(patient_split).fillna(own).astype(object)

    is_kermany_test = universe["source"] == "kermany/test"
    is_covid19 = (universe["source"] == "covid") & (universe["label"] == "covid")
    dataset2 = universe[is_kermany_test | is_covid19]
    adult_negatives = universe[(universe["source"] == "covid") & universe["label"].isin(["normal", "bacterial", "viral"])]
    adult_normals = universe[universe["source"].isin(["montgomery", "shenzhen"]) & (universe["finding"] == "normal")]
    adult_normals = adult_normals.assign(label="normal")
    deconfounded = pd.concat([dataset2, adult_negatives, adult_normals], ignore_index=True)
    jsrt_normals = [f[f["finding"] == "no nodule"].assign(label="normal")
                    for f in external if (f["archive"] == "jsrt").all()]
    screen = pd.concat([deconfounded, *jsrt_normals], ignore_index=True)
    evaluable = pd.concat([kermany[kermany["source"] == "kermany/test"], covid, lungseg, *external], ignore_index=True)
    truth = is_covid(evaluable)
    archives = evaluable[truth.notna()].assign(label=truth[truth.notna()].map({True: "covid", False: "other"}))

    def three_class(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(label=df["label"].map(TO_3CLASS))

    return {
        "kermany": kermany, "covid": covid, "lungseg": lungseg,
        **{frame["archive"].iloc[0]: frame for frame in external},
        **({"views": views.reset_index(drop=True)} if views is not None else {}),
        "tasks/source": source.reset_index(drop=True),
        "tasks/dataset2-4class": dataset2.reset_index(drop=True),
        "tasks/dataset2-3class": three_class(dataset2).reset_index(drop=True),
        "tasks/deconfounded-4class": deconfounded,
        "tasks/deconfounded-3class": three_class(deconfounded),
        "tasks/screen-4class": screen,
        "tasks/archives": archives.reset_index(drop=True),
    }
