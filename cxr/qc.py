"""Quality control in the classifier's own feature space: is this a frontal adult chest film
like those the classifier was trained on?

The features are the classifier's pooled layer4 activations (what its head reads), computed in
the same forward pass as the prediction. Fitted on its training images:

- **distance**: the squared Mahalanobis distance to the training images under probabilistic
  PCA (scikit-learn ``PCA``): inside the principal subspace each direction scaled by its
  variance, plus what lies outside the subspace scaled by the noise variance. The second term
  is what tells noise and photos apart: their features leave the subspace that chest films
  span. Two thresholds: ``out_of_distribution`` (above the 99th percentile of the
  validation films: an unfamiliar film) and ``not_a_chest_xray`` (far beyond every validation
  film: photos, noise, documents and the like);
- **pediatric**: a logistic regression on the same projection, children against adults. The
  only children in the curated data are Kermany's, so this also learns that archive's look:
  its figures on adults from other archives say how far that goes.

There is no lateral film in the curated data to learn from: lateral DICOMs are routed out by
their ViewPosition (``cxr.data.dicom_header``); a lateral film without the tag is not flagged.
The parameters are a few hundred KB, kept beside the classifier's weights
(``qc.safetensors`` + ``qc.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QC_WEIGHTS, QC_INFO = "qc.safetensors", "qc.json"
FLAGS = ("not_a_chest_xray", "out_of_distribution", "pediatric")


@dataclass
class QualityModel:
    mean: np.ndarray                 # (K,) feature mean
    components: np.ndarray           # (K, d) PCA projection
    variance: np.ndarray             # (d,) variance along each component
    noise_variance: float            # variance per dimension outside the subspace
    ood_threshold: float             # squared distance above which a film is unfamiliar
    not_cxr_threshold: float         # ... and above which it is not taken for a chest film
    pediatric_coef: np.ndarray | None = None      # (d,) logistic regression, children = 1
    pediatric_intercept: float = 0.0
    not_cxr_coef: np.ndarray | None = None        # (d + 1,) logistic regression, non-radiographs = 1
    not_cxr_intercept: float = 0.0
    not_cxr_probability_threshold: float = 1.0
    info: dict = field(default_factory=dict)      # what it was fitted on, and its figures

    def project(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) @ self.components

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` (B, K) to the training films,
        under probabilistic PCA, divided by K (about 1 for a typical training film)."""
        centred = np.asarray(features, np.float64) - self.mean
        z = centred @ self.components
        outside = np.maximum((centred ** 2).sum(axis=1) - (z ** 2).sum(axis=1), 0.0)
        return ((z ** 2 / self.variance).sum(axis=1) + outside / self.noise_variance) / len(self.mean)

    def _detector_input(self, features: np.ndarray) -> np.ndarray:
        z = self.project(features) / np.sqrt(self.variance)
        return np.column_stack([z, np.log1p(np.nan_to_num(self.distance(features), nan=1e6, posinf=1e6))])

    def not_cxr_probability(self, features: np.ndarray) -> np.ndarray | None:
        if self.not_cxr_coef is None:
            return None
        return 1 / (1 + np.exp(-(self._detector_input(features) @ self.not_cxr_coef + self.not_cxr_intercept)))

    def pediatric_probability(self, features: np.ndarray) -> np.ndarray | None:
        if self.pediatric_coef is None:
            return None
        return 1 / (1 + np.exp(-(self.project(features) @ self.pediatric_coef + self.pediatric_intercept)))

    def flags(self, features: np.ndarray) -> list[list[str]]:
        """The QC flags of each image (a non-empty list makes the row ``flagged``)."""
        d = self.distance(features)
        child = self.pediatric_probability(features)
        not_cxr = self.not_cxr_probability(features)
        out = []
        for i, di in enumerate(d):
            # A non-finite distance (NaN or inf features) is nothing the training films look like.
            far = not np.isfinite(di) or di > self.not_cxr_threshold
            detected = not_cxr is not None and not_cxr[i] > self.not_cxr_probability_threshold
            f = ["not_a_chest_xray"] if far or detected else (
                ["out_of_distribution"] if di > self.ood_threshold else [])
            if child is not None and child[i] >= 0.5 and not f:
                f.append("pediatric")
            out.append(f)
        return out

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean, "components": self.components, "variance": self.variance}
        if self.pediatric_coef is not None:
            tensors["pediatric_coef"] = self.pediatric_coef
        if self.not_cxr_coef is not None:
            tensors["not_cxr_coef"] = self.not_cxr_coef
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(Path(folder) / QC_WEIGHTS))
        (Path(folder) / QC_INFO).write_text(json.dumps({
            "noise_variance": self.noise_variance, "ood_threshold": self.ood_threshold,
            "not_cxr_threshold": self.not_cxr_threshold,
            "pediatric_intercept": self.pediatric_intercept, "not_cxr_intercept": self.not_cxr_intercept,
            "not_cxr_probability_threshold": self.not_cxr_probability_threshold, "info": self.info}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "QualityModel | None":
        """The folder's QC model, or None where it has none."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / QC_WEIGHTS).exists() or not (folder / QC_INFO).exists():
            return None
        t = {k: v.astype(np.float64) for k, v in load_file(str(folder / QC_WEIGHTS)).items()}
        meta = json.loads((folder / QC_INFO).read_text())
        return cls(t["mean"], t["components"], t["variance"], float(meta["noise_variance"]),
                   float(meta["ood_threshold"]),
                   float(meta["not_cxr_threshold"]), t.get("pediatric_coef"), float(meta["pediatric_intercept"]),
                   t.get("not_cxr_coef"), float(meta.get("not_cxr_intercept", 0.0)),
                   float(meta.get("not_cxr_probability_threshold", 1.0)), meta.get("info", {}))


def fit_quality_model(train: np.ndarray, val: np.ndarray, train_is_child: np.ndarray | None = None,
                      age_known: np.ndarray | None = None, non_radiographs: np.ndarray | None = None,
                      components: int = 32, ood_quantile: float = 0.99, not_cxr_factor: float = 3.0,
                      seed: int = 0) -> QualityModel:
    """Fit the distance on every training film's features; thresholds from the validation
    films' (the training films' where there are none): ``out_of_distribution`` at their
    ``ood_quantile``, ``not_a_chest_xray`` at ``not_cxr_factor`` x their largest distance (no
    validation film comes near it). The pediatric regression uses only the films whose age
    group is known (``age_known``), and needs children and adults among them."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    train, val = np.asarray(train, np.float64), np.asarray(val, np.float64)
    if len(train) < 2:
        raise ValueError(f"quality control needs at least 2 training films, got {len(train)}")
    pca = PCA(n_components=min(components, train.shape[0] - 1, train.shape[1]), random_state=seed).fit(train)
    z = pca.transform(train)
    # Floors: with as few images as dimensions the fit leaves no variance outside the subspace.
    floor = 1e-6 * max(float(pca.explained_variance_.mean()), 1e-12)
    model = QualityModel(pca.mean_, pca.components_.T, np.maximum(pca.explained_variance_, floor),
                         max(float(pca.noise_variance_), floor), 0.0, 0.0)
    reference = model.distance(val if len(val) else train)
    reference = reference[np.isfinite(reference)]
    model.ood_threshold = float(np.quantile(reference, ood_quantile))
    model.not_cxr_threshold = float(not_cxr_factor * reference.max())
    if non_radiographs is not None and len(non_radiographs):
        # Chest films against synthetic non-radiographs (``synthetic_non_radiographs``); its
        # threshold keeps 99% of the validation films unflagged.
        x = np.vstack([model._detector_input(train), model._detector_input(non_radiographs)])
        y = np.r_[np.zeros(len(train)), np.ones(len(non_radiographs))]
        lr = LogisticRegression(max_iter=5000, class_weight="balanced", C=0.1).fit(x, y)
        model.not_cxr_coef, model.not_cxr_intercept = lr.coef_[0], float(lr.intercept_[0])
        model.not_cxr_probability_threshold = max(0.5, float(np.quantile(
            model.not_cxr_probability(val if len(val) else train), ood_quantile)))
    if train_is_child is not None:
        known = np.ones(len(train), bool) if age_known is None else np.asarray(age_known, bool)
        child = np.asarray(train_is_child, bool)[known]
        if 0 < child.sum() < len(child):
            lr = LogisticRegression(max_iter=2000, class_weight="balanced").fit(z[known], child.astype(int))
            model.pediatric_coef, model.pediatric_intercept = lr.coef_[0], float(lr.intercept_[0])
    return model


def synthetic_non_radiographs(size: int, n: int = 120, seed: int = 1234) -> np.ndarray:
    """(n, 1, size, size) uint8 images no radiograph looks like, made here (nothing to download):
    noise (uniform, Gaussian, salt and pepper, smoothed), flat fields, gradients, stripes,
    checkerboards, random rectangles and ellipses, and text-like line patterns. The detector
    learns from these; its figures come from real images of other kinds (``jobs/fit_qc.py``)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            a = rng.integers(0, 256, (size, size))
        elif kind == 1:
            a = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), (size, size))
        elif kind == 2:
            a = np.where(rng.random((size, size)) < rng.uniform(0.1, 0.9), 0, 255)
        elif kind == 3:
            a = np.asarray(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).filter(
                ImageFilter.GaussianBlur(rng.uniform(1, 6))), np.float64)
            a = (a - a.min()) / max(np.ptp(a), 1e-6) * 255
        elif kind == 4:
            t = np.linspace(0, 1, size)
            a = np.outer(t, np.ones(size)) if rng.random() < 0.5 else np.outer(np.ones(size), t)
            a = (a * 255 * rng.uniform(0.2, 1) + rng.uniform(0, 100)) if rng.random() < 0.8 else np.full(
                (size, size), rng.uniform(0, 255))
        elif kind == 5:
            period = int(rng.integers(2, max(3, size // 4)))
            yy, xx = np.mgrid[:size, :size]
            a = (((yy // period) + (xx // period if rng.random() < 0.5 else 0)) % 2) * 255
        else:
            img = Image.new("L", (size, size), int(rng.integers(0, 256)))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(3, 25))):
                box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
                xy = [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1]
                if kind == 6:
                    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(xy, fill=int(rng.integers(0, 256)))
                else:
                    y = int(rng.integers(0, size))
                    draw.line([(int(rng.integers(0, size // 3)), y), (int(rng.integers(size // 2, size)), y)],
                              fill=int(rng.integers(0, 120)), width=int(rng.integers(1, 3)))
            a = np.asarray(img, np.float64)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return np.stack(out)[:, None]


def classifier_features(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The pooled layer4 features (N, K) of (N, 1, S, S) uint8 model-ready images (as
    ``Preprocess.prepare`` makes them), on the model's device."""
    import torch

    from cxr.models.classifier import logits_and_features
    from cxr.preprocess import classifier_input

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = classifier_input(torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).to(device))
            out.append(logits_and_features(model, x)[1].float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_for_task(model, train_images: np.ndarray, val_images: np.ndarray, train_age_groups) -> QualityModel:
    """A classifier's quality control from its own training and validation images (what
    ``cxr finetune`` registers with it); children against adults where both are known."""
    train_f, val_f = classifier_features(model, train_images), classifier_features(model, val_images)
    others = classifier_features(model, synthetic_non_radiographs(train_images.shape[-1]))
    ages = np.asarray(train_age_groups, dtype=object)
    qc = fit_quality_model(train_f, val_f, ages == "pediatric", np.isin(ages, ["pediatric", "adult"]), others)
    qc.info = {"fitted_on": {"train": len(train_f), "val": len(val_f),
                             "ages_known": int(np.isin(ages, ["pediatric", "adult"]).sum())}}
    return qc
