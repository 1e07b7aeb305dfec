"""The paper's task sets, and the de-confounded variant, built from the curated manifests.

- ``source``: kermany/train, 3 classes, split train/val (pretraining).
- ``dataset2-4class`` / ``dataset2-3class``: kermany/test + COVID-19 X-rays (the paper's
  dataset II), split train/val/test.
- ``deconfounded-4class`` / ``-3class``: dataset II plus adult negatives (lungseg normals,
  "No Finding" and non-COVID pneumonias from the COVID collection), because in dataset II every
  non-COVID image is pediatric and every COVID image is adult.

One split is drawn over the union of kermany/test, covid and lungseg, so every task and the
segmenter's lungseg split agree: an image is in the same split wherever it appears.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from cxr.data.manifest import covid_manifest, kermany_manifest, lungseg_manifest
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
    return {"kermany": kermany, "covid": covid, "lungseg": lungseg}


def split_and_build_tasks(bases: Mapping[str, pd.DataFrame], seed: int, fractions: Mapping[str, float],
                          source_val_fraction: float, exclude_shared_patients: bool = True) -> dict[str, pd.DataFrame]:
    """Assign splits to the base manifests (which must have ``sha256``) and derive the tasks.

    Kermany's train and test folders share 170 patient ids (457 train images, all pneumonia).
    Whether they are the same children cannot be told from the data, so by default those train
    images are left out of pretraining (split null): otherwise the pretrained backbone may have
    seen dataset II's test patients.
    """
    kermany, covid, lungseg = bases["kermany"].copy(), bases["covid"].copy(), bases["lungseg"].copy()

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
    for frame in (kermany, covid, lungseg):
        frame["split"] = frame["uri"].map(split_of).astype(object)
        frame.loc[frame["split"].isna(), "split"] = None

    is_kermany_test = universe["source"] == "kermany/test"
    is_covid19 = (universe["source"] == "covid") & (universe["label"] == "covid")
    dataset2 = universe[is_kermany_test | is_covid19]
    adult_negatives = universe[(universe["source"] == "covid") & universe["label"].isin(["normal", "bacterial", "viral"])]
    adult_normals = universe[universe["source"].isin(["montgomery", "shenzhen"]) & (universe["finding"] == "normal")]
    adult_normals = adult_normals.assign(label="normal")
    deconfounded = pd.concat([dataset2, adult_negatives, adult_normals], ignore_index=True)

    def three_class(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(label=df["label"].map(TO_3CLASS))

    return {
        "kermany": kermany, "covid": covid, "lungseg": lungseg,
        "tasks/source": source.reset_index(drop=True),
        "tasks/dataset2-4class": dataset2.reset_index(drop=True),
        "tasks/dataset2-3class": three_class(dataset2).reset_index(drop=True),
        "tasks/deconfounded-4class": deconfounded,
        "tasks/deconfounded-3class": three_class(deconfounded),
    }
