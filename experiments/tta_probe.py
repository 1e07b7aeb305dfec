"""Does test-time augmentation rank COVID-19 better on archives a model never saw?

    python -m experiments.tta_probe --crossval out/crossval/screen --out docs/results/tta_probe.json

For every fold of a ``cxr crossval`` run (its best checkpoint under ``out/ray``), the films it
reports on are predicted again under each view of ``VIEWS`` (the letterboxed image, a 90%
and an 80% centre zoom, a left-right mirror); a set's probability is the calibrated softmax of
the mean of its views' log-probabilities (the fold's own temperature). Judged on out-of-archive
predictions only: AUROC inside each COVID origin, pooled AUROC of COVID-19 films against adult
films without it, and the operating point's pooled figures (``cxr.operating_point.transfer_report``).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxr.card import Preprocessing
from cxr.classification import predict
from cxr.config import load_platform
from cxr.operating_point import adult_negatives, calibrated, log_probabilities, out_of_archive, transfer_report
from cxr.metrics import auroc_interval
from cxr.model_input import Preprocess
from cxr.workflows.crossval import fold_model


def zoom(images: np.ndarray, keep: float) -> np.ndarray:
    """The centre ``keep`` of (N, 1, S, S) uint8 images, resized back to S (bilinear)."""
    size = images.shape[-1]
    crop = int(round(size * keep))
    start = (size - crop) // 2
    x = torch.from_numpy(images[..., start:start + crop, start:start + crop]).float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255).byte().numpy()


VIEWS = {"identity": lambda x: x, "zoom 0.9": lambda x: zoom(x, 0.9), "zoom 0.8": lambda x: zoom(x, 0.8),
         "mirror": lambda x: np.ascontiguousarray(x[..., ::-1])}
SETS = {"none": ("identity",), "zooms": ("identity", "zoom 0.9", "zoom 0.8"), "mirror": ("identity", "mirror"),
        "all": tuple(VIEWS)}


def fold_predictions(folder: Path, ray_root: Path, name: str, storage) -> pd.DataFrame:
    fold = json.loads((folder / f"{name}.json").read_text())
    model, meta = fold_model(folder, name, str(ray_root))
    rows = pd.read_parquet(folder / f"{name}.parquet")
    prep = Preprocess(Preprocessing.for_classifier(int(meta["image_size"])))     # the screen recipe: whole images
    images, _ = prep.prepare(rows["uri"].tolist(), storage, 2)
    logs = {v: log_probabilities(predict(model, f(images))[0]) for v, f in VIEWS.items()}
    for name_, views in SETS.items():
        rows[f"p_{name_}"] = calibrated(np.mean([logs[v] for v in views], axis=0), fold["temperature"])[:, 0]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crossval", default="out/crossval/screen")
    p.add_argument("--ray-root", default="out/ray", help="where the folds' Ray Train checkpoints are")
    p.add_argument("--out", default="out/tta_probe.json")
    args = p.parse_args(argv)
    folder, storage = Path(args.crossval), load_platform().storage
    names = [j.stem for j in sorted(folder.glob("*.json")) if (folder / f"{j.stem}.parquet").exists()]
    frames = []
    for name in names:
        frames.append(fold_predictions(folder, Path(args.ray_root), name, storage))
        print(f"tta_probe: fold {name}", flush=True)
    held = out_of_archive(pd.concat(frames, ignore_index=True))
    covid, negative = held["is_covid"].to_numpy(bool), adult_negatives(held)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "crossval": str(folder),
           "views": list(VIEWS), "sets": {k: list(v) for k, v in SETS.items()}, "results": {}}
    for name_ in SETS:
        score = held[f"p_{name_}"].to_numpy(float)
        per_origin = {}
        for archive, g in held.groupby("archive"):
            if g["is_covid"].sum() >= 5 and (~g["is_covid"]).sum() >= 5:
                per_origin[archive] = auroc_interval(g["is_covid"].to_numpy(bool), g[f"p_{name_}"].to_numpy(float), 500)
        pooled = auroc_interval(covid[covid | negative], score[covid | negative], 500)
        transfer = transfer_report(held.assign(p_covid=score), n_boot=200)
        out["results"][name_] = {
            "pooled_auroc_covid_vs_adult_negatives": pooled, "auroc_inside_covid_origins": per_origin,
            "operating_point": {r: v["pooled_unseen"] for r, v in transfer["rules"].items()}}
        print(name_, f"pooled AUROC {pooled['value']:.3f}",
              {a: round(v["value"], 3) for a, v in per_origin.items()},
              {r: {k: round(m["value"], 3) for k, m in v["pooled_unseen"].items()}
               for r, v in transfer["rules"].items()}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
