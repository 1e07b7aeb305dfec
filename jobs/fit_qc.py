"""Fit a screen's quality control (``cxr.qc``) on its classifier's training films, measure each
flag on images it never saw, and store it beside the classifier's weights in the bundle.

    python -m jobs.fit_qc --bundle models/cxr-screen --training-manifest out/crossval/screen/all-train.parquet \\
        --manifests out/manifests --out docs/results/qc.json

- Fitted on the training split of the classifier's training manifest (and, for the
  not-a-chest-X-ray detector, synthetic non-radiographs made in code); thresholds from its
  validation split.
- **False flags** on chest films it did not train on: every archive's test split of the
  ``screen-4class`` task, and TBX11K (never trained on; a sample).
- **Sensitivity** on images that are not chest X-rays, all from files installed packages ship
  (no download): photos (scikit-learn's and matplotlib's sample images, and crops of them), an
  MRI slice (matplotlib's ``s1045.ima``), elevation maps and graphics, rendered text pages,
  noise, and flat or gradient images.
- **Pediatric**: Kermany's test split (children) against the adults of the other archives.

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

from cxr.config import load_platform
from cxr.data.decode import decode_image
from cxr.data.storage import read_bytes
from cxr.qc import FLAGS, classifier_features, fit_quality_model, synthetic_non_radiographs


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


def rates(flags: list[list[str]]) -> dict:
    n = len(flags)
    return {"n": n, "any_flag": sum(bool(f) for f in flags) / n if n else None,
            **{flag: sum(flag in f for f in flags) / n if n else None for flag in FLAGS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/cxr-screen", help="the screen bundle (folder), written in place")
    p.add_argument("--training-manifest", required=True, help="its classifier's training manifest (train/val rows)")
    p.add_argument("--manifests", default="out/manifests", help="cxr prepare-data output of the curated data")
    p.add_argument("--tbx11k", type=int, default=300, help="TBX11K films to check (never trained on)")
    p.add_argument("--out", default="out/qc.json")
    args = p.parse_args(argv)
    from cxr.package import read_screen, write_checksums
    from cxr.screen import Screen

    storage = load_platform().storage
    bundle = Path(args.bundle)
    classifier, segmenter, _ = read_screen(bundle)
    screen = Screen(classifier, None, "cpu")
    screen.qc = None
    train_rows = pd.read_parquet(args.training_manifest)
    fit_rows, val_rows = train_rows[train_rows["split"] == "train"], train_rows[train_rows["split"] == "val"]
    print(f"fit_qc: features of {len(fit_rows)} training and {len(val_rows)} validation films", flush=True)
    train_f = features(screen, manifest_grays(fit_rows, storage))
    val_f = features(screen, manifest_grays(val_rows, storage))
    child = (fit_rows["age_group"] == "pediatric").to_numpy()
    known = fit_rows["age_group"].isin(["pediatric", "adult"]).to_numpy()
    synthetic = synthetic_non_radiographs(screen.preprocess.size)
    others_f = features(screen, list(synthetic[:, 0]))
    qc = fit_quality_model(train_f, val_f, child, known, others_f)

    task = pd.read_parquet(Path(args.manifests) / "tasks" / "screen-4class.parquet")
    test = task[task["split"] == "test"]
    tbx = pd.read_parquet(Path(args.manifests) / "tasks" / "archives.parquet").query("archive == 'tbx11k'")
    tbx = tbx.sample(min(args.tbx11k, len(tbx)), random_state=0)
    chest = pd.concat([test, tbx], ignore_index=True)
    print(f"fit_qc: {len(chest)} held-out chest films", flush=True)
    chest_flags = qc.flags(features(screen, manifest_grays(chest, storage)))
    per_archive = {a: rates([chest_flags[i] for i in np.flatnonzero((chest["archive"] == a).to_numpy())])
                   for a in sorted(chest["archive"].unique())}
    adults = (chest["age_group"] == "adult").to_numpy()
    children = (chest["age_group"] == "pediatric").to_numpy()
    others = {kind: rates(qc.flags(features(screen, grays))) for kind, grays in not_chest_xrays().items()}
    all_others = [f for kind, grays in not_chest_xrays().items() for f in qc.flags(features(screen, grays))]
    figures = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bundle": str(bundle),
        "fitted_on": {"manifest": args.training_manifest, "train": len(fit_rows), "ages_known": int(known.sum()),
                      "val": len(val_rows),
                      "pca_components": int(qc.components.shape[1])},
        "thresholds": {"out_of_distribution": qc.ood_threshold, "not_a_chest_xray": qc.not_cxr_threshold},
        "chest_films_not_trained_on": {"all": rates(chest_flags), "by_archive": per_archive},
        "pediatric": {"children_flagged": rates([chest_flags[i] for i in np.flatnonzero(children)])["pediatric"],
                      "adults_flagged": rates([chest_flags[i] for i in np.flatnonzero(adults)])["pediatric"],
                      "n_children": int(children.sum()), "n_adults": int(adults.sum())},
        "not_chest_xrays": {"all": rates(all_others), "by_kind": others},
    }
    qc.info = {"fitted_on": figures["fitted_on"], "date": figures["date"],
               "figures": "docs/results/qc.json of cxr (jobs/fit_qc.py)"}
    qc.save(bundle / "classifier")
    write_checksums(bundle)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: figures[k] for k in ("thresholds", "pediatric")}, indent=1))
    print("chest films not trained on:", {a: round(r["any_flag"], 3) for a, r in per_archive.items()})
    print("not chest X-rays:", {k: round(r["any_flag"], 3) for k, r in others.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
