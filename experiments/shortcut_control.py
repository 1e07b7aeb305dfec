"""The shortcut control (issue 14): how well a small model tells which archive an image comes
from, from the whole image, from the lungs only, and from outside the lungs only.

    python -m experiments.shortcut_control --pretrain-run RUN --segmenter models:/cxr-segmenter/3 \\
        --out docs/results/shortcut_control.json

The images (``tasks/archives.parquet``, at most ``--per-archive`` per archive) are letterboxed
at ``--image-size``; the lungs are cut with the segmenter as a lung-masked classifier's are, and
"outside" is the rest of the image. Features are those of the pretraining backbone every recipe
starts from (its pooled 2048 values); the small model is a multinomial logistic regression
(scikit-learn), scored out of fold (5 folds grouped by patient). Balanced accuracy is the mean
recall over archives (chance: 1 / number of archives), with a 95% bootstrap interval. High
accuracy from the lungs alone means masking cannot remove the archive's signature.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def features(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled backbone features (N, 2048) of (N, 1, S, S) uint8 images."""
    import torch
    from torch import nn

    from cxr.preprocess import classifier_input

    model.fc = nn.Identity()
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(classifier_input(torch.from_numpy(images[start:start + batch_size]).float())).numpy())
    return np.concatenate(out)


def archive_accuracy(x: np.ndarray, archives: np.ndarray, groups: np.ndarray, seed: int = 0,
                     n_boot: int = 1000) -> dict:
    """Out-of-fold balanced accuracy of predicting ``archives`` from ``x``, with its interval
    and the recall of each archive."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    predicted = cross_val_predict(model, x, archives, groups=groups, cv=folds)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(archives), len(archives))
        draws.append(balanced_accuracy_score(archives[idx], predicted[idx]))
    names = sorted(set(archives))
    recalls = recall_score(archives, predicted, labels=names, average=None)
    return {"balanced_accuracy": float(balanced_accuracy_score(archives, predicted)),
            "low": float(np.percentile(draws, 2.5)), "high": float(np.percentile(draws, 97.5)),
            "chance": 1 / len(names), "recall": {n: float(r) for n, r in zip(names, recalls)}}


def run(pretrain_run: str, segmenter_uri: str, manifests: str, image_size: int, per_archive: int, seed: int) -> dict:
    from cxr import tracking
    from cxr.card import Preprocessing
    from cxr.config import load_platform
    from cxr.data.manifest import read_manifest
    from cxr.model_input import Preprocess
    from cxr.workflows.benchmark import machine

    platform = load_platform()
    rows = read_manifest(str(Path(manifests) / "tasks" / "archives.parquet"))
    rows = rows.sample(frac=1, random_state=seed).groupby("archive").head(per_archive).reset_index(drop=True)
    segmenter = tracking.load_registered(platform.tracking_uri, segmenter_uri)
    uris = rows["uri"].tolist()
    whole, _ = Preprocess(Preprocessing.for_classifier(image_size)).prepare(uris, platform.storage, 2)
    lungs, _ = Preprocess(Preprocessing.for_classifier(image_size, True, segmenter.name, segmenter.version),
                          segmenter).prepare(uris, platform.storage, 2)
    outside = np.where(lungs > 0, 0, whole).astype(np.uint8)
    from cxr.train.checkpoints import load_run_checkpoint
    backbone, _ = load_run_checkpoint(platform.tracking_uri, pretrain_run)
    archives, groups = rows["archive"].to_numpy(), rows["patient_id"].fillna(rows["uri"]).to_numpy()
    variants = {}
    for name, images in (("whole image", whole), ("lungs only", lungs), ("outside the lungs only", outside)):
        variants[name] = archive_accuracy(features(backbone, images), archives, groups, seed)
        print(f"{name:24s} balanced accuracy {variants[name]['balanced_accuracy']:.3f} "
              f"[{variants[name]['low']:.3f}, {variants[name]['high']:.3f}] (chance {variants[name]['chance']:.3f})")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "pretrain_run": pretrain_run, "segmenter": f"{segmenter.name} v{segmenter.version}",
            "image_size": image_size, "images": rows["archive"].value_counts().sort_index().to_dict(),
            "model": "logistic regression on the pretrained backbone's pooled features, 5 folds grouped by patient",
            "variants": variants}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-run", required=True, help="MLflow run id of the cxr pretrain run (the features)")
    p.add_argument("--segmenter", default="models:/cxr-segmenter@champion", help="registered segmenter for the lungs")
    p.add_argument("--manifests", default="out/manifests", help="folder with tasks/archives.parquet")
    p.add_argument("--image-size", type=int, default=96, help="letterbox size in px (the recipes' CPU preset: 96)")
    p.add_argument("--per-archive", type=int, default=150, help="at most this many images per archive")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/shortcut_control.json", help="the JSON to write")
    args = p.parse_args(argv)
    try:
        result = run(args.pretrain_run, args.segmenter, args.manifests, args.image_size, args.per_archive, args.seed)
    except Exception as e:  # noqa: BLE001 - a missing manifest, model or server: one line, exit 1
        print(f"shortcut_control: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
