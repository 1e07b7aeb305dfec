"""Rebuild this sample from the curated data: python data/sample/make_sample.py [DATA_ROOT].

Copies a fixed, seeded selection of real images (under 3 MB in all) with the same layout and
metadata files as the curated data, so every builder and job runs on it unchanged. Only images
whose licence allows redistribution of modified copies are taken from the COVID collection.
"""

import shutil
import sys
from pathlib import Path

import pandas as pd

SEED = 7
HERE = Path(__file__).resolve().parent
COVID_LICENSES = {"CC BY 3.0", "CC BY 4.0", "CC BY"}


def main(root: Path) -> None:
    for part in ("kermany", "covid", "lungseg"):
        shutil.rmtree(HERE / part, ignore_errors=True)

    kermany = pd.read_csv(root / "kermany/labels.csv", dtype=str)
    picked = pd.concat([
        g.sample(n=12 if split == "train" else 8, random_state=SEED)
        for (split, _), g in kermany.groupby(["split", "label"])])
    _copy(root / "kermany", picked["filename"], picked, "labels.csv")

    covid = pd.read_csv(root / "covid/metadata.csv", dtype=str, keep_default_na=False)
    ok = covid[covid["license"].isin(COVID_LICENSES)]
    picked = pd.concat([ok[ok["finding"] == "COVID-19"].sample(n=30, random_state=SEED),
                        ok[ok["finding"] == "No Finding"].sample(n=6, random_state=SEED)])
    _copy(root / "covid", picked["filename"], picked, "metadata.csv")

    pairs = pd.read_csv(root / "lungseg/pairs.csv", dtype=str)
    picked = pd.concat([g.sample(n=10, random_state=SEED) for _, g in pairs.groupby(["source", "tb_label"])])
    _copy(root / "lungseg", pd.concat([picked["image"], picked["mask"]]), picked, "pairs.csv")


def _copy(src: Path, files: pd.Series, meta: pd.DataFrame, meta_name: str) -> None:
    dst = HERE / src.name
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)
    meta.sort_index().to_csv(dst / meta_name, index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "../../../shared/data").resolve())
