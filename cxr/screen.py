"""The screen: segmenter + classifier + preprocessing + operating point, as one object.

``Screen`` runs the model-input path (``cxr.model_input.Preprocess``) and the classifier on
batches and makes the fields of a scores row; ``Screen.predict`` is the Python API
(``cxr.load(...).predict(paths_or_bytes)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxr.data.decode import DecodeLimits
from cxr.data.dicom_header import age_years
from cxr.data.errors import BadImageError, describe
from cxr.data.storage import StorageConfig, read_bytes
from cxr.model_input import Preprocess, default_device
from cxr.package import Component
from cxr.preprocess import classifier_input
from cxr.qc import BLOCKING


ADULT_YEARS = 18.0


@dataclass(frozen=True)
class QualityLimits:
    """Lung-area fractions that flag an image: no lungs found, or a fraction out of range."""

    no_lungs: float = 0.01
    low: float = 0.08
    high: float = 0.50

    def flags(self, fraction: float | None) -> list[str]:
        return [f["flag"] for f in self.assess(fraction)]

    def assess(self, fraction: float | None) -> list[dict]:
        """The flag a lung fraction raises, as ``{"flag", "score", "threshold"}`` (``cxr.qc.QualityModel.assess``)."""
        if fraction is None or not np.isfinite(fraction):
            return []
        if fraction < self.no_lungs:
            return [{"flag": "no_lungs_found", "score": float(fraction), "threshold": self.no_lungs}]
        if fraction < self.low or fraction > self.high:
            return [{"flag": "lung_fraction_out_of_range", "score": float(fraction),
                     "threshold": self.low if fraction < self.low else self.high}]
        return []


def with_age(flags: list[dict], patient_age: str | None) -> list[dict]:
    """Quality flags with ``pediatric`` decided by the DICOM PatientAge where it is given (under
    18 years; the score is the age, the threshold 18), else by the learnt detector. The detector
    learnt children from one archive of children only (Kermany's), so a stated age is the
    better evidence."""
    years = age_years(patient_age)
    if years is None:
        return flags
    kept = [f for f in flags if f["flag"] != "pediatric"]
    blocked = any(f["flag"] in BLOCKING for f in kept)
    return kept + ([{"flag": "pediatric", "score": float(years), "threshold": ADULT_YEARS}]
                   if years < ADULT_YEARS and not blocked else [])


def screen_label_index(probs: np.ndarray, covid: int | None, threshold: float | None) -> np.ndarray:
    """The one rule for a row's ``predicted_label`` (docs/SCORES.md): COVID-19 when its
    calibrated probability is at or above the card's operating point (the screen is
    positive), otherwise the most probable of the other classes; without an operating point,
    the most probable class. So a row's label and its screen result never disagree; the raw
    most probable class is kept as ``argmax_label``. ``probs``: (B, C) calibrated."""
    probs = np.asarray(probs)      # compared in its own dtype (float32 in serving), as the card's threshold was set
    if covid is None or threshold is None or not probs.size:
        return probs.argmax(axis=1) if probs.size else np.zeros(len(probs), int)
    others = probs.copy()
    others[:, covid] = -np.inf
    return np.where(probs[:, covid] >= threshold, covid, others.argmax(axis=1))


# The fields of a scores row that a screen produces (cxr.scoring adds lineage and job columns).
ROW_FIELDS = ("uri", "sha256", "status", "error", "skip_reason", "labels", "probabilities", "predicted_label",
              "argmax_label", "covid_probability", "covid_threshold", "screen_positive", "heatmap_png", "heatmap_size",
              "heatmap_label", "heatmap_scale", "covid_heatmap_png", "covid_heatmap_scale", "lung_mask_png",
              "lung_fraction", "qc_flags", "qc_scores", "qc_signals")


class Screen:
    """A classifier, the segmenter its preprocessing needs (or one for the quality signal only),
    and the card's operating point, on one device."""

    def __init__(self, classifier: Component, segmenter: Component | None = None,
                 device: str | torch.device | None = None, quality: QualityLimits = QualityLimits(),
                 bf16: bool | None = None, storage: StorageConfig | None = None):
        self.device = torch.device(device) if device else default_device()
        self.classifier = Component(classifier.model.to(self.device).eval(), classifier.card, classifier.name,
                                    classifier.version, classifier.qc)
        self.segmenter = (Component(segmenter.model.to(self.device).eval(), segmenter.card, segmenter.name,
                                    segmenter.version) if segmenter else None)
        self.preprocess = Preprocess(classifier.card.preprocessing, self.segmenter)
        self.qc = classifier.qc            # quality control in the classifier's feature space (cxr.qc), if it has one
        self.labels = list(classifier.card.labels)
        op = classifier.card.operating_point
        self.covid = self.labels.index("covid") if "covid" in self.labels else None
        self.threshold = op.threshold if op is not None and op.label == "covid" else None
        self.temperature = float(op.temperature) if op is not None else 1.0
        self.quality, self.storage = quality, storage
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        if self.device.type == "cuda":
            self.classifier.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device | None = None, **kwargs) -> "Screen":
        """A bundle, or a registered screen's downloaded artifacts."""
        from cxr.package import read_screen

        classifier, segmenter, _ = read_screen(Path(folder), "cpu")
        return cls(classifier, segmenter, device, **kwargs)

    # --- batches of letterboxed images ----------------------------------------------------------

    @torch.no_grad()
    def infer(self, images: np.ndarray, seg_images: np.ndarray | None, heatmap_size: int | None = 64) -> dict:
        """(B, S, S) uint8 letterboxed images (and the segmenter's) -> {"probs" (B, C), "fraction"
        (B,) or None, "features" (B, K) (what quality control reads), and with ``heatmap_size``:
        "heatmaps" (B, h, h) uint8 of the predicted class, "scales" (B,), "covid_heatmaps" and
        "covid_scales" (or None without a covid label), "lungs" (B, h, h) uint8 0/255 or None}."""
        from cxr.explain import heatmap_to_uint8, screen_maps

        x_u8 = torch.from_numpy(np.ascontiguousarray(images)[:, None]).to(self.device)
        seg = torch.from_numpy(np.ascontiguousarray(seg_images)[:, None]) if seg_images is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x, fraction, lungs = self.preprocess.with_lungs(x_u8, seg)
            x = classifier_input(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            probs, features, heat, scale, covid_heat, covid_scale = screen_maps(
                self.classifier.model, x, heatmap_size or 7, self.covid, choose=self._label_classes)
        probs = self._calibrated(probs)
        out = {"probs": probs.float().cpu().numpy(), "features": features.float().cpu().numpy(),
               "fraction": fraction.float().cpu().numpy() if fraction is not None else None}
        if heatmap_size:
            out.update(heatmaps=heatmap_to_uint8(heat), scales=scale.float().cpu().numpy(),
                       covid_heatmaps=heatmap_to_uint8(covid_heat) if covid_heat is not None else None,
                       covid_scales=covid_scale.float().cpu().numpy() if covid_scale is not None else None,
                       lungs=(F.interpolate(lungs.float(), size=(heatmap_size, heatmap_size), mode="nearest")[:, 0]
                              .mul(255).to(torch.uint8).cpu().numpy() if lungs is not None else None))
        return out

    def _calibrated(self, probs: torch.Tensor) -> torch.Tensor:
        """The card's calibration (cxr calibrate, fine-tuning) of softmax outputs."""
        if self.temperature == 1.0:
            return probs
        return torch.softmax(torch.log(probs.float().clamp_min(1e-12)) / self.temperature, dim=1)

    def _label_classes(self, probs: torch.Tensor) -> torch.Tensor:
        """``screen_label_index`` of uncalibrated softmax outputs: the class each heatmap explains."""
        chosen = screen_label_index(self._calibrated(probs).float().cpu().numpy(), self.covid, self.threshold)
        return torch.as_tensor(chosen, device=probs.device, dtype=torch.long)

    def rows(self, uris: Sequence[str], sha256: Sequence[str | None], errors: Sequence[str | None],
             images: np.ndarray, seg_images: np.ndarray | None, heatmap_size: int = 64,
             skipped: Sequence[str | None] | None = None, ages: Sequence[str | None] | None = None) -> dict[str, list]:
        """The screen's fields of a scores row (``ROW_FIELDS``) for a batch; an input with an
        error is an ``error`` row, one routed out (``skipped``: its reason) a ``skipped`` row,
        neither run through the models; the others ``ok`` or ``flagged`` (a quality flag).
        ``ages``: each input's DICOM PatientAge, which decides ``pediatric`` where it is given."""
        from cxr.explain import heatmap_png

        n = len(uris)
        skipped = list(skipped) if skipped is not None else [None] * n
        ok = np.array([e is None and r is None for e, r in zip(errors, skipped)], bool)
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        fraction = np.full(n, np.nan, np.float32)
        pngs = {k: [None] * n for k in ("heatmap_png", "covid_heatmap_png", "lung_mask_png")}
        scales = {k: [None] * n for k in ("heatmap_scale", "covid_heatmap_scale")}
        details: list[list[dict]] = [[] for _ in range(n)]
        signals: list[dict | None] = [None] * n
        if ok.any():
            out = self.infer(images[ok], seg_images[ok] if seg_images is not None else None, heatmap_size)
            probs[ok] = out["probs"]
            if out["fraction"] is not None:
                fraction[ok] = out["fraction"]
            for j, i in enumerate(np.flatnonzero(ok)):
                for column, key in (("heatmap_png", "heatmaps"), ("covid_heatmap_png", "covid_heatmaps"),
                                    ("lung_mask_png", "lungs")):
                    if out.get(key) is not None:
                        pngs[column][i] = heatmap_png(out[key][j])
                for column, key in (("heatmap_scale", "scales"), ("covid_heatmap_scale", "covid_scales")):
                    if out.get(key) is not None:
                        scales[column][i] = float(out[key][j])
            model_flags = self.qc.assess(out["features"]) if self.qc is not None else [[] for _ in range(int(ok.sum()))]
            for i, extra in zip(np.flatnonzero(ok), model_flags):
                details[i] = self.quality.assess(float(fraction[i])) + with_age(extra, ages[i] if ages else None)
            if self.qc is not None:
                measured = self.qc.signals(out["features"])
                for j, i in enumerate(np.flatnonzero(ok)):
                    signals[i] = {name: float(values[j]) for name, values in measured.items()}
        flags = [[f["flag"] for f in d] for d in details]
        status = ["error" if errors[i] is not None else "skipped" if skipped[i] is not None
                  else "flagged" if flags[i] else "ok" for i in range(n)]
        # A film flagged as not a frontal chest film (cxr.qc.BLOCKING) is not screened and gets
        # no label; other flags mark the row for review and keep both.
        screened = ok & np.array([not set(f) & BLOCKING for f in flags], bool)
        if self.covid is not None:
            screened &= np.isfinite(probs[:, self.covid])       # no probability, no answer
        chosen = screen_label_index(np.nan_to_num(probs, nan=0.0), self.covid, self.threshold)
        return {
            "uri": list(uris), "sha256": list(sha256), "status": status, "error": list(errors), "skip_reason": skipped,
            "labels": [self.labels if ok[i] else None for i in range(n)],
            "probabilities": [probs[i].tolist() if ok[i] else None for i in range(n)],
            "predicted_label": [self.labels[int(chosen[i])] if screened[i] else None for i in range(n)],
            "argmax_label": [self.labels[int(np.argmax(probs[i]))] if ok[i] else None for i in range(n)],
            "covid_probability": [float(probs[i, self.covid]) if ok[i] and self.covid is not None else None
                                  for i in range(n)],
            "covid_threshold": [self.threshold] * n,
            # The same comparison as the label's, so the two cannot disagree.
            "screen_positive": [bool(chosen[i] == self.covid)
                                if screened[i] and self.threshold is not None else None for i in range(n)],
            "heatmap_png": pngs["heatmap_png"], "heatmap_size": [heatmap_size or None] * n,
            # Which class the stored heatmap explains (the label rule's), and the COVID map.
            "heatmap_label": [self.labels[int(chosen[i])] if ok[i] and heatmap_size else None for i in range(n)],
            **scales, "covid_heatmap_png": pngs["covid_heatmap_png"], "lung_mask_png": pngs["lung_mask_png"],
            "lung_fraction": [float(fraction[i]) if ok[i] and np.isfinite(fraction[i]) else None for i in range(n)],
            "qc_flags": flags, "qc_scores": details, "qc_signals": signals,
        }

    # --- the Python API -------------------------------------------------------------------------

    def predict(self, inputs, batch_size: int = 32, heatmap_size: int = 64, storage: StorageConfig | None = None,
                max_bytes: int = 64 * 2**20) -> pd.DataFrame:
        """Score images given as paths / URIs (local or s3://), bytes, or a DataFrame with a
        ``path`` or an ``image`` (bytes) column. One row per input, in order, with the fields of a
        scores row (``ROW_FIELDS``); an input that cannot be read or decoded is an ``error`` row
        with the reason, never an exception."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = _as_items(inputs)
        limits = DecodeLimits(max_bytes=max_bytes)
        columns: dict[str, list] = {f: [] for f in ROW_FIELDS}
        for start in range(0, len(items), batch_size):
            uris, shas, errors, boxed = [], [], [], []
            skipped, ages = [], []
            for i, item in enumerate(items[start:start + batch_size], start):
                uri, data, error, pair, reason, age = self._decode(item, i, storage or self.storage, limits)
                uris.append(uri)
                shas.append(hashlib.sha256(data).hexdigest() if data is not None else None)
                errors.append(error)
                boxed.append(pair)
                skipped.append(reason)
                ages.append(age)
            images, seg_images = _stack(boxed, self.preprocess.sizes)
            for k, v in self.rows(uris, shas, errors, images, seg_images, heatmap_size, skipped, ages).items():
                columns[k].extend(v)
        frame = pd.DataFrame(columns, columns=list(ROW_FIELDS))
        frame["classifier"] = _ref(self.classifier)
        frame["segmenter"] = _ref(self.segmenter) if self.segmenter else None
        return frame


    def _decode(self, item, i: int, storage: StorageConfig | None, limits: DecodeLimits) -> tuple:
        """(uri, bytes or None, error or None, letterboxed pair or None, skip reason or None,
        DICOM PatientAge or None) of one input: a DICOM that is not a frontal chest radiograph is routed out by its header
        (``cxr.data.dicom_header``), as the nightly job does. Whatever goes wrong with one input
        is its error, with a reason a person understands."""
        from cxr.data.dicom_header import header_text, read_header, skip_reason

        if isinstance(item, ValueError):         # an input contract broken by this row (_as_items)
            return f"<input #{i}>", None, str(item), None, None, None
        if isinstance(item, str):
            uri = item
        elif isinstance(item, bytes):
            uri = f"<bytes #{i}>"
        else:
            return (f"<input #{i}>", None, f"not an image path or bytes: {type(item).__name__} {str(item)[:80]!r}",
                    None, None, None)
        data = None
        try:
            data = read_bytes(item, storage, limits.max_bytes) if isinstance(item, str) else item
            header = read_header(data, uri)
            reason = skip_reason(header)
            age = header_text(header, "PatientAge") if header is not None else None
            if reason:
                return uri, data, None, None, reason, age
            return uri, data, None, self.preprocess.decoded(data, uri, limits), None, age
        except BadImageError as e:
            return uri, data, e.reason, None, None, None
        except Exception as e:  # noqa: BLE001 - per-input isolation: a URI scheme, storage, a decoder bug
            return uri, data, describe(e), None, None, None


def _ref(c: Component) -> str:
    return f"{c.name}/{c.version}" if c.name else c.card.architecture


def _as_items(inputs) -> list:
    """One item per input: a str (path or URI), bytes, or anything else (then an error row).
    A DataFrame row gives its ``image`` bytes or its ``path``; a row with both is an error row
    (which one was meant cannot be told), never a silent choice."""
    if isinstance(inputs, pd.DataFrame):
        if "image" not in inputs and "path" not in inputs:
            raise ValueError(f"a DataFrame input needs a 'path' or an 'image' column, got {list(inputs.columns)}")
        images = inputs["image"] if "image" in inputs else pd.Series([None] * len(inputs), index=inputs.index)
        paths = inputs["path"] if "path" in inputs else pd.Series([None] * len(inputs), index=inputs.index)
        return [ValueError("both a path and image bytes were given: pass one of them")
                if _present(image) and _present(path) else _one(image) if _present(image) else _one(path)
                for image, path in zip(images, paths)]
    if isinstance(inputs, (str, bytes, bytearray, memoryview, Path)) or \
            (isinstance(inputs, np.ndarray) and inputs.dtype == np.uint8 and inputs.ndim == 1):
        inputs = [inputs]        # one image, not a sequence of inputs (an encoded buffer is one image)
    return [_one(v) for v in inputs]


def _present(value) -> bool:
    """A value, not a missing one (None, NaN, pd.NA, NaT: whatever the column's dtype)."""
    return not (value is None or (np.ndim(value) == 0 and not isinstance(value, (bytes, str)) and pd.isna(value)))


def _one(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    return value


def _stack(boxed: list, sizes: tuple[int, int | None]) -> tuple[np.ndarray, np.ndarray | None]:
    size, seg_size = sizes
    images = np.stack([b[0] if b else np.zeros((size, size), np.uint8) for b in boxed])
    seg = (np.stack([b[1] if b else np.zeros((seg_size, seg_size), np.uint8) for b in boxed])
           if seg_size else None)
    return images, seg
