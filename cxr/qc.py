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
- **not a chest X-ray**: a logistic regression on the projection and the distance, chest films
  against synthetic non-radiographs (documents, noise, flat fields leave the subspace);
- **view**: a multinomial logistic regression on the standardised features:
  frontal chest films (the training films) against lateral films and CT slices saved as plain
  images (``external/views``, where present) and synthetic non-radiographs, giving the
  ``lateral``, ``ct_slice`` and ``not_a_chest_xray`` flags. Each threshold keeps all but
  ``FALSE_FLAG_QUANTILE`` of the validation films unflagged;
- **pediatric**: a logistic regression on the standardised features, children against adults, at
  the probability the validation adults stay under (the same quantile). The only children in
  the curated data are Kermany's, so this also learns that archive's look: its figures on
  adults from other archives say how far that goes.

A flag comes with its score and the threshold it crossed (``assess``). Some flags stop the
screen (``BLOCKING``: what was scored is not a frontal adult chest film, so a COVID-19 result
on it means nothing the screen was validated for); the others only mark the row for review,
the screen result still given.
The parameters are a few hundred KB, kept beside the classifier's weights
(``qc.safetensors`` + ``qc.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QC_WEIGHTS, QC_INFO = "qc.safetensors", "qc.json"
FLAGS = ("not_a_chest_xray", "ct_slice", "lateral", "out_of_distribution", "pediatric")
# Flags that stop the screen: the film is not a frontal adult chest radiograph, which is all
# the screen was validated on (docs/RESULTS.md, "Quality control that keeps real films":
# together they stopped 1.7% of the COVID-19 films of archives never trained on, each about
# 1% or less, while children, unblocked, were called screen-positive at 26%). ``out_of_distribution`` (and the lung-fraction flags) mark the row
# for review and keep the screen result: they flag real adult chest films, COVID-19 ones too.
BLOCKING = frozenset({"not_a_chest_xray", "ct_slice", "lateral", "pediatric"})
# The scores behind the flags, stored for every scored row (``qc_signals``) whether or not a
# flag was raised: the distance to the training films and the detectors' probabilities.
SIGNALS = ("distance", "not_a_chest_xray", "pediatric", "lateral", "ct_slice")
# The view detector's classes, frontal first (the films the classifier was trained on).
VIEW_CLASSES = ("frontal", "lateral", "ct_slice", "not_a_chest_xray")
# Each learnt flag's threshold leaves this share of the validation films (adults, for
# ``pediatric``) above it: the in-distribution false-flag rate each flag is allowed.
FALSE_FLAG_QUANTILE = 0.995


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
    pediatric_threshold: float = 0.5
    view_coef: np.ndarray | None = None           # (len(VIEW_CLASSES), K) multinomial regression
    view_intercept: np.ndarray | None = None      # (len(VIEW_CLASSES),)
    view_thresholds: dict = field(default_factory=dict)   # flag -> probability threshold
    # Standardisation of the features for the view and pediatric detectors (since the view
    # detector): they read all K features, not the PCA projection, which is fitted on frontal
    # films only and loses what tells a lateral film or a CT slice from one.
    feature_mean: np.ndarray | None = None
    feature_scale: np.ndarray | None = None

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

    def _standardized(self, features: np.ndarray) -> np.ndarray:
        return np.nan_to_num((np.asarray(features, np.float64) - self.feature_mean) / self.feature_scale,
                             nan=0.0, posinf=1e6, neginf=-1e6)

    def pediatric_probability(self, features: np.ndarray) -> np.ndarray | None:
        if self.pediatric_coef is None:
            return None
        x = self._standardized(features) if self.feature_scale is not None else self.project(features)
        return 1 / (1 + np.exp(-np.clip(x @ self.pediatric_coef + self.pediatric_intercept, -500, 500)))

    def view_probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """(B, len(VIEW_CLASSES)) probabilities of the view detector, or None without one."""
        if self.view_coef is None:
            return None
        x = self._standardized(features) if self.feature_scale is not None else self._detector_input(features)
        logits = x @ self.view_coef.T + self.view_intercept
        logits = np.nan_to_num(logits - logits.max(axis=1, keepdims=True), nan=0.0)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def assess(self, features: np.ndarray) -> list[list[dict]]:
        """Each image's flags, each as ``{"flag", "score", "threshold"}`` (the score that crossed
        the threshold), most serious first: a film that is not a chest film, a CT slice or a
        lateral film gets that one flag; otherwise ``out_of_distribution`` and ``pediatric``
        may both apply."""
        d = self.distance(features)
        child = self.pediatric_probability(features)
        not_cxr = self.not_cxr_probability(features)
        views = self.view_probabilities(features)
        out = []
        for i, di in enumerate(d):
            found = []
            # A non-finite distance (NaN or inf features) is nothing the training films look like.
            if not np.isfinite(di) or di > self.not_cxr_threshold:
                found.append({"flag": "not_a_chest_xray", "score": float(np.nan_to_num(di, nan=np.inf)),
                              "threshold": self.not_cxr_threshold})
            elif not_cxr is not None and not_cxr[i] > self.not_cxr_probability_threshold:
                found.append({"flag": "not_a_chest_xray", "score": float(not_cxr[i]),
                              "threshold": self.not_cxr_probability_threshold})
            elif views is not None:
                for c, name in enumerate(VIEW_CLASSES):
                    t = self.view_thresholds.get(name)
                    if t is not None and views[i, c] > t:
                        found.append({"flag": name, "score": float(views[i, c]), "threshold": float(t)})
                found = sorted(found, key=lambda f: -f["score"])[:1]
            if not found:
                if di > self.ood_threshold:
                    found.append({"flag": "out_of_distribution", "score": float(di), "threshold": self.ood_threshold})
                if child is not None and child[i] >= self.pediatric_threshold:
                    found.append({"flag": "pediatric", "score": float(child[i]), "threshold": self.pediatric_threshold})
            out.append(found)
        return out

    def signals(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every score quality control reads, for every image whether or not it raised a flag
        (``SIGNALS``; those this model has no detector for are left out): what a night's
        distribution is compared on (``cxr.monitoring``)."""
        out = {"distance": self.distance(features)}
        for name, values in (("not_a_chest_xray", self.not_cxr_probability(features)),
                             ("pediatric", self.pediatric_probability(features))):
            if values is not None:
                out[name] = values
        views = self.view_probabilities(features)
        if views is not None:
            out.update({name: views[:, VIEW_CLASSES.index(name)] for name in ("lateral", "ct_slice")})
        return out

    def flags(self, features: np.ndarray) -> list[list[str]]:
        """The QC flags of each image (a non-empty list makes the row ``flagged``)."""
        return [[f["flag"] for f in found] for found in self.assess(features)]

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean, "components": self.components, "variance": self.variance}
        if self.pediatric_coef is not None:
            tensors["pediatric_coef"] = self.pediatric_coef
        if self.not_cxr_coef is not None:
            tensors["not_cxr_coef"] = self.not_cxr_coef
        if self.view_coef is not None:
            tensors["view_coef"], tensors["view_intercept"] = self.view_coef, self.view_intercept
        if self.feature_scale is not None:
            tensors["feature_mean"], tensors["feature_scale"] = self.feature_mean, self.feature_scale
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(Path(folder) / QC_WEIGHTS))
        (Path(folder) / QC_INFO).write_text(json.dumps({
            "noise_variance": self.noise_variance, "ood_threshold": self.ood_threshold,
            "not_cxr_threshold": self.not_cxr_threshold,
            "pediatric_intercept": self.pediatric_intercept, "not_cxr_intercept": self.not_cxr_intercept,
            "not_cxr_probability_threshold": self.not_cxr_probability_threshold,
            "pediatric_threshold": self.pediatric_threshold, "view_classes": list(VIEW_CLASSES),
            "view_thresholds": self.view_thresholds, "info": self.info}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "QualityModel | None":
        """The folder's QC model, or None where it has none."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / QC_WEIGHTS).exists() or not (folder / QC_INFO).exists():
            return None
        t = {k: v.astype(np.float64) for k, v in load_file(str(folder / QC_WEIGHTS)).items()}
        meta = json.loads((folder / QC_INFO).read_text())
        if "view_coef" in t and tuple(meta.get("view_classes", ())) != VIEW_CLASSES:
            raise ValueError(f"{folder / QC_INFO}: view classes {meta.get('view_classes')} are not {list(VIEW_CLASSES)}")
        # Files written before the view detector (no view_*, pediatric at 0.5) load as they were.
        return cls(t["mean"], t["components"], t["variance"], float(meta["noise_variance"]),
                   float(meta["ood_threshold"]),
                   float(meta["not_cxr_threshold"]), t.get("pediatric_coef"), float(meta["pediatric_intercept"]),
                   t.get("not_cxr_coef"), float(meta.get("not_cxr_intercept", 0.0)),
                   float(meta.get("not_cxr_probability_threshold", 1.0)), meta.get("info", {}),
                   float(meta.get("pediatric_threshold", 0.5)), t.get("view_coef"), t.get("view_intercept"),
                   {k: float(v) for k, v in meta.get("view_thresholds", {}).items()},
                   t.get("feature_mean"), t.get("feature_scale"))


def fit_quality_model(train: np.ndarray, val: np.ndarray, train_is_child: np.ndarray | None = None,
                      age_known: np.ndarray | None = None, non_radiographs: np.ndarray | None = None,
                      views: np.ndarray | None = None, view_kinds=None, val_is_adult: np.ndarray | None = None,
                      components: int = 32, ood_quantile: float = 0.99, not_cxr_factor: float = 3.0,
                      false_flag_quantile: float = FALSE_FLAG_QUANTILE, detector_c: float = 0.01,
                      seed: int = 0) -> QualityModel:
    """Fit the distance on every training film's features; thresholds from the validation
    films' (the training films' where there are none): ``out_of_distribution`` at their
    ``ood_quantile``, ``not_a_chest_xray`` at ``not_cxr_factor`` x their largest distance (no
    validation film comes near it). The view detector learns the training films (frontal)
    against ``views`` (features of lateral films and CT slices, ``view_kinds`` "lateral" or
    "ct") and ``non_radiographs``; each of its flags, and ``pediatric``, at the probability
    that ``false_flag_quantile`` of the validation films (adults: ``val_is_adult``) stay under.
    Both detectors are logistic regressions (inverse regularisation ``detector_c``) on the
    features standardised by the training films'. The pediatric regression uses only the films
    whose age group is known (``age_known``), and needs children and adults among them."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    train, val = np.asarray(train, np.float64), np.asarray(val, np.float64)
    if len(train) < 2:
        raise ValueError(f"quality control needs at least 2 training films, got {len(train)}")
    pca = PCA(n_components=min(components, train.shape[0] - 1, train.shape[1]), random_state=seed).fit(train)
    # Floors: with as few images as dimensions the fit leaves no variance outside the subspace.
    floor = 1e-6 * max(float(pca.explained_variance_.mean()), 1e-12)
    model = QualityModel(pca.mean_, pca.components_.T, np.maximum(pca.explained_variance_, floor),
                         max(float(pca.noise_variance_), floor), 0.0, 0.0)
    reference_films = val if len(val) else train
    reference = model.distance(reference_films)
    reference = reference[np.isfinite(reference)]
    model.ood_threshold = float(np.quantile(reference, ood_quantile))
    model.not_cxr_threshold = float(not_cxr_factor * reference.max())
    kinds = {"lateral": "lateral", "ct": "ct_slice"}
    parts = [(train, "frontal")]
    if views is not None and len(views):
        view_kinds = np.asarray(view_kinds, dtype=object)
        unknown = sorted(set(view_kinds) - set(kinds))
        if unknown:
            raise ValueError(f"view kinds {unknown} are not among {sorted(kinds)}")
        parts += [(np.asarray(views, np.float64)[view_kinds == k], name) for k, name in kinds.items()]
    if non_radiographs is not None and len(non_radiographs):
        parts.append((np.asarray(non_radiographs, np.float64), "not_a_chest_xray"))
        # Chest films against synthetic non-radiographs in the PCA projection and the distance
        # (what leaves the subspace chest films span): documents, noise and flat fields, which
        # the view detector on the standardised features misses.
        x = np.vstack([model._detector_input(train), model._detector_input(non_radiographs)])
        y = np.r_[np.zeros(len(train)), np.ones(len(non_radiographs))]
        lr = LogisticRegression(max_iter=5000, class_weight="balanced", C=0.1).fit(x, y)
        model.not_cxr_coef, model.not_cxr_intercept = lr.coef_[0], float(lr.intercept_[0])
        model.not_cxr_probability_threshold = max(0.5, float(np.quantile(
            model.not_cxr_probability(reference_films), false_flag_quantile)))
    parts = [(x, name) for x, name in parts if len(x)]
    model.feature_mean = train.mean(axis=0)
    model.feature_scale = np.maximum(train.std(axis=0), 1e-6 * max(float(train.std()), 1e-12))
    if len(parts) > 1:
        x = np.vstack([model._standardized(f) for f, _ in parts])
        y = np.concatenate([np.full(len(f), VIEW_CLASSES.index(name)) for f, name in parts])
        # Strongly regularised: 2,048 features and a few hundred examples of a kind.
        lr = LogisticRegression(max_iter=5000, class_weight="balanced", C=detector_c).fit(x, y)
        # Classes with no examples get a logit that never wins; a two-class fit is the
        # softmax of (0, w.x + b).
        coef = np.zeros((len(VIEW_CLASSES), x.shape[1]))
        intercept = np.full(len(VIEW_CLASSES), -1e4)
        if len(lr.classes_) == 2:
            intercept[lr.classes_[0]] = 0.0
            coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
        else:
            coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
        model.view_coef, model.view_intercept = coef, intercept
        on_films = model.view_probabilities(reference_films)
        model.view_thresholds = {name: max(0.5, float(np.quantile(on_films[:, VIEW_CLASSES.index(name)],
                                                                  false_flag_quantile)))
                                 for _, name in parts[1:]}
    if train_is_child is not None:
        known = np.ones(len(train), bool) if age_known is None else np.asarray(age_known, bool)
        child = np.asarray(train_is_child, bool)[known]
        if 0 < child.sum() < len(child):
            lr = LogisticRegression(max_iter=5000, class_weight="balanced", C=detector_c).fit(
                model._standardized(train[known]), child.astype(int))
            model.pediatric_coef, model.pediatric_intercept = lr.coef_[0], float(lr.intercept_[0])
            adults = val[np.asarray(val_is_adult, bool)] if val_is_adult is not None and len(val) else val[:0]
            if len(adults):
                model.pediatric_threshold = max(0.5, float(np.quantile(model.pediatric_probability(adults),
                                                                       false_flag_quantile)))
    return model


def synthetic_non_radiographs(size: int, n: int = 120, seed: int = 1234) -> np.ndarray:
    """(n, 1, size, size) uint8 images no radiograph looks like, made here (nothing to download):
    noise (uniform, Gaussian, salt and pepper, smoothed), flat fields, gradients, stripes,
    checkerboards, random rectangles and ellipses, and text-like line patterns. The detectors
    learn from these; their figures come from real images of other kinds (``experiments/fit_qc.py``).
    (Blocks of rendered words were tried as a kind too: they did not teach the detectors to
    flag rendered text pages, and raised the false flags on films of unseen archives.)"""
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


def fit_for_task(model, train_images: np.ndarray, val_images: np.ndarray, train_age_groups,
                 val_age_groups=None, view_images: np.ndarray | None = None, view_kinds=None) -> QualityModel:
    """A classifier's quality control from its own training and validation images (what
    ``cxr finetune`` registers with it); children against adults where both are known; the
    view detector from ``view_images`` (lateral films and CT slices, ``view_kinds``) where given."""
    train_f, val_f = classifier_features(model, train_images), classifier_features(model, val_images)
    others = classifier_features(model, synthetic_non_radiographs(train_images.shape[-1]))
    views = classifier_features(model, view_images) if view_images is not None and len(view_images) else None
    ages = np.asarray(train_age_groups, dtype=object)
    val_adult = (np.asarray(val_age_groups, dtype=object) == "adult") if val_age_groups is not None else None
    qc = fit_quality_model(train_f, val_f, ages == "pediatric", np.isin(ages, ["pediatric", "adult"]), others,
                           views, view_kinds, val_adult)
    qc.info = {"fitted_on": {"train": len(train_f), "val": len(val_f),
                             "ages_known": int(np.isin(ages, ["pediatric", "adult"]).sum()),
                             "views": len(views) if views is not None else 0}}
    return qc
