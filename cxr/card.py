"""The model card: the typed contract between training and serving.

Every registered model, exported bundle and screen carries one (``card.json``). It holds all
that serving needs to feed the model what it saw in training (``Preprocessing``), what its
outputs mean (labels, the screening ``OperatingPoint``), what it was trained on
(``DatasetDigest``) and how well it did (metrics with intervals). ``ModelCard.from_dict``
validates a card when a model is registered and when it is loaded, and names the field that
is wrong. Cards written before this module existed (card_version 0, a plain dict) are read
through ``_upgrade_v0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from cxr.data.letterbox import PAD_VALUE as LETTERBOX_FILL
from cxr.preprocess import CLASSIFIER_MEAN, CLASSIFIER_STD, PREPROCESS_VERSION, SEGMENTER_MEAN, SEGMENTER_STD

CARD_VERSION = 1
INTENDED_USE = "research use, not for diagnosis"
TASKS = ("classifier", "segmenter")
DEFAULT_DILATION_PX = 3     # the one default of the lung-mask dilation, for cards that name none


class CardError(ValueError):
    """A model card that serving cannot trust; the message names the field."""


def _fail(path: str, problem: str) -> CardError:
    return CardError(f"model card field {path!r}: {problem}")


@dataclass(frozen=True)
class Preprocessing:
    """Decoded 8-bit grayscale image -> model input: letterbox to ``letterbox_size`` (padding
    ``letterbox_fill``), optionally zero everything outside the lungs found by the pinned
    segmenter (mask dilated by ``dilation_px``), scale to [0, 1], normalise."""

    letterbox_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    letterbox_fill: int = LETTERBOX_FILL
    lung_mask: bool = False
    segmenter_name: str | None = None
    segmenter_version: str | None = None
    dilation_px: int = DEFAULT_DILATION_PX
    version: str = PREPROCESS_VERSION

    @property
    def sha256(self) -> str:
        """A digest to compare preprocessing by (what the model sees, not who pinned it)."""
        spec = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("segmenter_name", "segmenter_version")}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    @property
    def segmenter_uri(self) -> str | None:
        return f"models:/{self.segmenter_name}/{self.segmenter_version}" if self.lung_mask else None

    @classmethod
    def for_classifier(cls, size: int, lung_mask: bool = False, segmenter_name: str | None = None,
                       segmenter_version: str | None = None, dilation_px: int = DEFAULT_DILATION_PX) -> "Preprocessing":
        return cls(letterbox_size=size, channels=3, mean=CLASSIFIER_MEAN, std=CLASSIFIER_STD, lung_mask=lung_mask,
                   segmenter_name=segmenter_name if lung_mask else None,
                   segmenter_version=str(segmenter_version) if lung_mask else None, dilation_px=int(dilation_px))

    @classmethod
    def for_segmenter(cls, size: int, dilation_px: int = DEFAULT_DILATION_PX) -> "Preprocessing":
        """``dilation_px``: the dilation a classifier trained on this segmenter's masks uses by default."""
        return cls(letterbox_size=size, channels=1, mean=(SEGMENTER_MEAN,), std=(SEGMENTER_STD,),
                   dilation_px=int(dilation_px))

    def validate(self, path: str = "preprocessing") -> None:
        if not 8 <= self.letterbox_size <= 4096:
            raise _fail(f"{path}.letterbox_size", f"must be 8..4096, got {self.letterbox_size}")
        if self.channels not in (1, 3):
            raise _fail(f"{path}.channels", f"must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise _fail(f"{path}.{name}", f"needs {self.channels} value(s), got {list(getattr(self, name))}")
        # What cxr.preprocess implements: a card that says otherwise describes a model this cxr
        # would feed the wrong input, so it is refused rather than silently ignored.
        implemented = {1: ((SEGMENTER_MEAN,), (SEGMENTER_STD,)), 3: (CLASSIFIER_MEAN, CLASSIFIER_STD)}[self.channels]
        for name, want in zip(("mean", "std"), implemented):
            got = getattr(self, name)
            if not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(got, want)):
                raise _fail(f"{path}.{name}", f"this cxr normalises {self.channels}-channel input with {name} "
                                              f"{list(want)}, the card says {list(got)}")
        if self.letterbox_fill != LETTERBOX_FILL:
            raise _fail(f"{path}.letterbox_fill", f"this cxr pads with {LETTERBOX_FILL}, got {self.letterbox_fill}")
        if not 0 <= self.dilation_px <= 64:
            raise _fail(f"{path}.dilation_px", f"must be 0..64, got {self.dilation_px}")
        if self.lung_mask and not (self.segmenter_name and self.segmenter_version):
            raise _fail(f"{path}.segmenter_version", "a lung-masked model must pin its segmenter (name and version)")
        if self.version != PREPROCESS_VERSION:
            raise _fail(f"{path}.version", f"this cxr implements preprocessing version {PREPROCESS_VERSION}, "
                                            f"the model was trained with {self.version}")


@dataclass(frozen=True)
class OperatingPoint:
    """The screening threshold on ``label``'s probability, chosen on validation data. The
    probabilities are softmax(logits / ``temperature``) (temperature scaling: 1 is none);
    serving and evaluation apply it, so the threshold means what it meant when chosen. A cxr
    that predates ``temperature`` refuses such a card (unknown field) rather than ignoring it."""

    threshold: float
    min_specificity: float
    chosen_on: str
    label: str = "covid"
    temperature: float = 1.0


@dataclass(frozen=True)
class DatasetDigest:
    """A manifest a model was trained on: where it was and the digest of its rows; and what it
    learnt from (its train and validation rows), so a gate set can be checked against it:
    rows per ``archives``, the ``images``' sha256 and the ``patients``' ids as sha256 (the
    first 16 hex digits: no patient id leaves the training data in the clear)."""

    name: str
    uri: str
    sha256: str
    rows: int | None = None
    archives: dict | None = None
    images: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, uri: str, sha256: str, rows: int, used) -> "DatasetDigest":
        """The digest of a manifest of ``rows`` rows; what it learnt from is the train and val
        rows of ``used`` (the rows the model was given)."""
        learnt = used[used["split"].isin(["train", "val"])] if "split" in used else used
        archives = ({str(k): int(v) for k, v in learnt["archive"].value_counts().sort_index().items()}
                    if "archive" in learnt else None)
        images = tuple(sorted(set(learnt["sha256"].dropna()))) if "sha256" in learnt else ()
        patients = tuple(sorted({patient_digest(p) for p in learnt["patient_id"].dropna()})) \
            if "patient_id" in learnt else ()
        return cls(name, portable(uri), sha256, int(rows), archives, images, patients)


def portable(value):
    """``value`` (a string, or lists and dicts of them) with no machine path in it, for cards
    and bundles that travel: a local absolute path becomes relative to the repository
    (``out/manifests/x.parquet``) or to the data root (``$CXR_DATA/fullres/...``), else its
    file name alone; URIs (``s3://``, ``models:/``) and other text are kept."""
    import os

    from cxr.config import REPO_ROOT, default_data_root

    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    path = os.path.normpath(value)
    for root, shown in ((str(REPO_ROOT), ""), (os.path.abspath(default_data_root()), "$CXR_DATA/")):
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return shown + os.path.relpath(path, root)
    return os.path.basename(path)


def patient_digest(patient_id: str) -> str:
    """How a card names a patient: not the id, the first 16 hex digits of its sha256."""
    return hashlib.sha256(str(patient_id).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelCard:
    task: str                                   # classifier | segmenter
    architecture: str                           # cxr.models registry name
    labels: tuple[str, ...]
    input_shape: tuple[int, int, int]           # (C, H, W) of the model input
    output: str
    preprocessing: Preprocessing
    model_kwargs: dict = field(default_factory=dict)
    operating_point: OperatingPoint | None = None
    training_data: tuple[DatasetDigest, ...] = ()
    metrics: dict = field(default_factory=dict)
    init: str | None = None
    intended_use: str = INTENDED_USE
    run_id: str | None = None
    git_commit: str | None = None
    provenance: dict = field(default_factory=dict)   # e.g. the registry and version a bundle came from
    card_version: int = CARD_VERSION

    def validate(self, check_architecture: bool = True) -> "ModelCard":
        """Raise ``CardError`` naming the first bad field. ``check_architecture=False`` skips the
        one check that imports the model builders (torch): for a driver that only plans."""
        if self.task not in TASKS:
            raise _fail("task", f"must be one of {list(TASKS)}, got {self.task!r}")
        if check_architecture:
            from cxr.models import model_names

            if self.architecture not in model_names(self.task):
                raise _fail("architecture", f"{self.architecture!r} is not a {self.task}; "
                                            f"choices: {model_names(self.task)}")
        if not self.labels or len(set(self.labels)) != len(self.labels) or \
                not all(isinstance(label, str) and label for label in self.labels):
            raise _fail("labels", f"must be distinct, non-empty strings, got {list(self.labels)}")
        if self.task == "classifier" and self.model_kwargs.get("num_classes", len(self.labels)) != len(self.labels):
            raise _fail("model_kwargs.num_classes", f"{self.model_kwargs['num_classes']} outputs for "
                                                    f"{len(self.labels)} labels")
        if len(self.input_shape) != 3 or self.input_shape[0] != self.preprocessing.channels or \
                self.input_shape[1:] != (self.preprocessing.letterbox_size,) * 2:
            raise _fail("input_shape", f"{list(self.input_shape)} does not match the preprocessing "
                                       f"({self.preprocessing.channels} x {self.preprocessing.letterbox_size}^2)")
        self.preprocessing.validate()
        if self.task == "segmenter" and self.preprocessing.lung_mask:
            raise _fail("preprocessing.lung_mask", "a segmenter's input is never lung-masked")
        op = self.operating_point
        if op is not None:
            if op.label not in self.labels:
                raise _fail("operating_point.label", f"{op.label!r} is not one of the labels {list(self.labels)}")
            if not (math.isfinite(op.threshold) and 0 <= op.threshold <= 1.000001):    # ABOVE_ONE: nothing passes
                raise _fail("operating_point.threshold", f"must be a probability, got {op.threshold}")
            if not (math.isfinite(op.min_specificity) and 0 <= op.min_specificity <= 1):
                raise _fail("operating_point.min_specificity", f"must be in [0, 1], got {op.min_specificity}")
            if isinstance(op.temperature, bool) or not isinstance(op.temperature, (int, float)) or \
                    not (math.isfinite(op.temperature) and 0.01 <= op.temperature <= 100):
                raise _fail("operating_point.temperature", f"must be a number in [0.01, 100], got {op.temperature!r}")
        for i, d in enumerate(self.training_data):
            for name in ("name", "uri", "sha256"):
                if not isinstance(getattr(d, name), str):
                    raise _fail(f"training_data[{i}].{name}", f"expected a string, got {getattr(d, name)!r}")
        for name in ("intended_use", "output"):
            if not isinstance(getattr(self, name), str):
                raise _fail(name, f"expected a string, got {getattr(self, name)!r}")
        for name in ("init", "run_id", "git_commit"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _fail(name, f"expected a string or null, got {getattr(self, name)!r}")
        if self.card_version != CARD_VERSION:
            raise _fail("card_version", f"this cxr reads card version {CARD_VERSION}, got {self.card_version}")
        return self

    # --- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready: NaN and infinities become null (JSON has none, and MLflow's UI shows them raw)."""
        return _finite(dataclasses.asdict(self)) | {"preprocessing_sha256": self.preprocessing.sha256}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, raw: dict, check_architecture: bool = True) -> "ModelCard":
        """Build and validate; a missing or mistyped field raises ``CardError`` naming it."""
        if not isinstance(raw, dict):
            raise CardError(f"a model card is a JSON object, got {type(raw).__name__}")
        try:
            if "card_version" not in raw:
                raw = _upgrade_v0(raw)
            version = raw["card_version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise _fail("card_version", f"expected an integer, got {version!r}")
            for name, kind in (("model_kwargs", dict), ("metrics", dict), ("provenance", dict),
                               ("training_data", list)):
                if raw.get(name) is not None and not isinstance(raw[name], kind):
                    raise _fail(name, f"expected {kind.__name__}, got {type(raw[name]).__name__}")
            if raw.get("operating_point") is not None and not isinstance(raw["operating_point"], dict):
                raise _fail("operating_point", "expected an object or null")
            recorded_sha = raw.get("preprocessing_sha256")
            raw = {k: v for k, v in raw.items() if k != "preprocessing_sha256"}
            card = cls(
                task=_get(raw, "task", str), architecture=_get(raw, "architecture", str),
                labels=tuple(_get(raw, "labels", list)), input_shape=tuple(int(x) for x in _get(raw, "input_shape", list)),
                output=_get(raw, "output", str),
                preprocessing=_build(Preprocessing, _get(raw, "preprocessing", dict), "preprocessing"),
                model_kwargs=dict(raw.get("model_kwargs") or {}),
                operating_point=(_build(OperatingPoint, raw["operating_point"], "operating_point")
                                 if raw.get("operating_point") is not None else None),
                training_data=tuple(_build(DatasetDigest, d, f"training_data[{i}]")
                                    for i, d in enumerate(raw.get("training_data") or [])),
                metrics=dict(raw.get("metrics") or {}), init=raw.get("init"),
                intended_use=raw.get("intended_use", INTENDED_USE), run_id=raw.get("run_id"),
                git_commit=raw.get("git_commit"), provenance=dict(raw.get("provenance") or {}),
                card_version=version)
        except CardError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as e:
            raise CardError(f"model card: not readable ({type(e).__name__}: {e})") from e
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CardError(f"model card: unknown field(s) {unknown}")
        card.validate(check_architecture)
        if recorded_sha is not None and recorded_sha != card.preprocessing.sha256:
            raise _fail("preprocessing_sha256", "does not match the preprocessing it describes (edited by hand?)")
        return card

    @classmethod
    def from_json(cls, text: str, check_architecture: bool = True) -> "ModelCard":
        return cls.from_dict(json.loads(text), check_architecture)


def _get(raw: dict, name: str, kind: type) -> Any:
    if name not in raw or raw[name] is None:
        raise _fail(name, "missing")
    value = raw[name]
    if kind is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind):
        raise _fail(name, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, path: str):
    """A nested dataclass from a mapping, with the field named on a missing or extra key."""
    if not isinstance(raw, dict):
        raise _fail(path, f"expected an object, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _fail(path, f"unknown field(s) {unknown}; valid: {sorted(names)}")
    values = {}
    for name, f in names.items():
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise _fail(f"{path}.{name}", "missing")
            continue
        value = raw[name]
        if name in ("mean", "std"):
            if not isinstance(value, list) or not all(_is_number(v) for v in value):
                raise _fail(f"{path}.{name}", f"expected a list of numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif name in ("letterbox_size", "channels", "letterbox_fill", "dilation_px") or (name == "rows" and value is not None):
            if not _is_number(value) or not math.isfinite(value) or int(value) != value:
                raise _fail(f"{path}.{name}", f"expected an integer, got {value!r}")
            value = int(value)
        elif name in ("threshold", "min_specificity", "temperature"):
            if not _is_number(value):
                raise _fail(f"{path}.{name}", f"expected a number, got {value!r}")
            value = float(value)
        elif name == "archives" and value is not None:
            if not isinstance(value, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in value.items()):
                raise _fail(f"{path}.{name}", "expected an object of archive: rows")
            value = {k: int(v) for k, v in value.items()}
        elif name in ("images", "patients"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _fail(f"{path}.{name}", "expected a list of strings")
            value = tuple(value)
        elif name == "lung_mask":
            if not isinstance(value, bool):
                raise _fail(f"{path}.{name}", f"expected true or false, got {value!r}")
        elif name in ("segmenter_version", "version") and value is not None:
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise _fail(f"{path}.{name}", f"expected a string, got {value!r}")
            value = str(value)
        elif value is not None and not isinstance(value, str):
            raise _fail(f"{path}.{name}", f"expected a string, got {value!r}")
        values[name] = value
    return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):      # numpy scalars
        return _finite(obj.item())
    return obj


def _upgrade_v0(raw: dict) -> dict:
    """A card written as a plain dict by cxr before card version 1 (issue 12), read as version 1."""
    prep = dict(raw.get("preprocessing") or {})
    task = raw.get("task")
    shape = (raw.get("input") or {}).get("shape") if isinstance(raw.get("input"), dict) else None
    dilation = prep.get("dilation_px", raw.get("mask_dilation_px", DEFAULT_DILATION_PX))
    preprocessing = {k: prep[k] for k in ("letterbox_size", "letterbox_fill", "channels", "mean", "std",
                                          "lung_mask", "segmenter_name", "segmenter_version", "version") if k in prep}
    preprocessing.setdefault("mean", list(CLASSIFIER_MEAN) if task == "classifier" else [SEGMENTER_MEAN])
    preprocessing.setdefault("std", list(CLASSIFIER_STD) if task == "classifier" else [SEGMENTER_STD])
    for name in ("mean", "std"):      # v0 segmenter cards wrote one number
        if _is_number(preprocessing[name]):
            preprocessing[name] = [preprocessing[name]]
    preprocessing["dilation_px"] = dilation
    metrics = dict(raw.get("metrics") or {})
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    screening = test.get("screening") if isinstance(test.get("screening"), dict) else None
    digest = raw.get("training_manifest_sha256")
    return {
        "task": task, "architecture": raw.get("architecture"), "labels": raw.get("labels"),
        "input_shape": shape, "output": raw.get("output", ""), "preprocessing": preprocessing,
        "model_kwargs": raw.get("model_kwargs") or {},
        "operating_point": ({k: screening.get(k) for k in ("threshold", "min_specificity", "chosen_on")}
                            if screening else None),
        "training_data": ([{"name": "train", "uri": raw.get("training_manifest", ""), "sha256": digest}]
                          if digest else []),
        "metrics": metrics, "init": raw.get("init"), "intended_use": raw.get("intended_use", INTENDED_USE),
        "run_id": raw.get("run_id"), "git_commit": raw.get("git_commit"), "card_version": CARD_VERSION,
    }
