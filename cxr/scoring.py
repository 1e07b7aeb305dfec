"""The Ray Data scoring pipeline: inputs -> bytes -> decoded, letterboxed images (CPU tasks) ->
segment, mask, classify and Grad-CAM (one actor pool) -> Parquet, committed atomically.

Exactly-once: what a run scores is decided from the listing and the current rows
(``cxr.new_work``), so a rerun reads no byte of what it scored, and a run killed at any point,
started again, fills exactly the gaps. How parts are committed: ``cxr.scores_table``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from cxr.data.decode import DecodeLimits, check_size
from cxr.data.gpu_decode import jpeg_frame
from cxr.data.dicom_header import IDENTITY_COLUMNS, Pseudonymiser, identity, read_header, skip_reason
from cxr.data.errors import BadImageError, describe
from cxr.data.images import decode_boxed
from cxr.data.storage import StorageConfig, is_s3, read_bytes
from cxr.preprocess import PREPROCESS_VERSION
from cxr.scores_table import SCHEMA, SCHEMA_VERSION, key

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelRef:
    """A registered model resolved once by the driver: actors load this exact version, even if
    the alias moves while the job runs."""

    uri: str
    name: str
    version: str
    alias: str | None
    run_id: str | None

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# --- stage 1: bytes -> images (CPU tasks) -------------------------------------------------------

STORAGE_ERRORS = ("S3 403 Forbidden", "storage error:")


class StorageOutage(RuntimeError):
    """Most of a batch could not be read after the store's retries: the store, not the files."""


def storage_reason(error: OSError) -> str:
    """A person's reading of a storage error that is about one object (it starts with one of
    ``STORAGE_ERRORS``, so the next run tries that object again)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "ACCESS_DENIED" in text or "AccessDenied" in text or " 403" in text:
        return f"{STORAGE_ERRORS[0]} (no permission to read this object): {text[:200]}"
    return f"{STORAGE_ERRORS[1]} {type(error).__name__}: {text[:300]}"


def decode_batch(batch: dict[str, np.ndarray], sizes: tuple[int, int | None], fill: int, skip: set[str],
                 max_bytes: int, storage: StorageConfig | None, max_unreadable_share: float = 0.5,
                 pseudonymiser: Pseudonymiser = Pseudonymiser(), device_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Read, hash, decode and letterbox each input at the classifier's and the segmenter's size
    (``cxr.data.images.decode_boxed``, the CPU half of the model's ``Preprocess``), decoding each
    film only down to twice the larger of the two (``cxr.data.decode``). A DICOM's
    header gives its identity columns (patient identifiers through ``pseudonymiser``) and may
    route it out (``cxr.data.dicom_header.skip_reason``): a ``skipped`` row, never decoded.
    With ``device_jpeg``, a baseline JPEG that needs no display transform is not decoded here:
    its frame goes in the ``jpeg`` column, for the scoring actor to decode on its device
    (``cxr.data.gpu_decode``).

    Inputs whose key is in ``skip`` are dropped. Whatever goes wrong with one input (a bad
    file, an odd DICOM header, an unsupported URI, an object the store refuses) is that input's
    ``error`` row with the reason; it never fails the batch. Only when storage errors hit more
    than ``max_unreadable_share`` of the batch (and at least 2 inputs) does the batch fail with
    ``StorageOutage``, naming the first input and its error: that is the store, not the files,
    and writing no rows lets the next run score them.
    """
    limits = DecodeLimits(max_bytes=max_bytes)
    out = {"uri": [], "sha256": [], "status": [], "error": [], "skip_reason": [], "image": [], "seg_image": [],
           "image_height": [], "image_width": [], "source_size": [], "source_mtime_ns": [], "source_etag": [],
           "source_version_id": [], "jpeg": [], **{c: [] for c in IDENTITY_COLUMNS}}
    blank = tuple(np.zeros((s, s), np.uint8) if s else None for s in sizes)
    unreadable: list[tuple[str, str]] = []
    n_in = len(batch["uri"])
    sizes_in = batch.get("source_size", np.full(n_in, -1, np.int64))
    mtimes_in = batch.get("source_mtime_ns", np.zeros(n_in, np.int64))
    etags_in = batch.get("source_etag", np.full(n_in, None, object))
    versions_in = batch.get("source_version_id", np.full(n_in, None, object))
    for uri, size, mtime, etag, version_id in zip(batch["uri"], sizes_in, mtimes_in, etags_in, versions_in):
        uri = str(uri)
        sha, error, images, reason, shape, ident = None, None, blank, None, (None, None), identity(None, pseudonymiser)
        frame = None
        try:
            data = read_bytes(uri, storage, max_bytes)
            sha = hashlib.sha256(data).hexdigest()
            if key(uri, sha) in skip:
                continue
            header = read_header(data, uri)
            ident, reason = identity(header, pseudonymiser), skip_reason(header)
            frame = jpeg_frame(data, header) if device_jpeg and reason is None else None
            if frame is not None:
                check_size(uri, frame.width, frame.height, limits)
                shape = (frame.height, frame.width)
            elif reason is None:
                film, images = decode_boxed(data, uri, limits, sizes, fill)
                shape = (film.height, film.width)
        except BadImageError as e:
            error = e.reason
        except OSError as e:
            error = storage_reason(e)
            if is_s3(uri) and not error.startswith(STORAGE_ERRORS[0]):
                # Only what says "the store is failing" counts towards an outage: a 403 is this
                # object's, and a local errno is this file's.
                unreadable.append((uri, error))
        except Exception as e:  # noqa: BLE001 - per-input isolation: one input never stops the night
            error = describe(e)
        if error and sha is None and key(uri, None) in skip:
            continue
        out["uri"].append(uri)
        out["sha256"].append(sha)
        out["status"].append("error" if error else "skipped" if reason else "ok")
        out["error"].append(error)
        out["skip_reason"].append(None if error else reason)
        out["image"].append(images[0])
        out["seg_image"].append(images[1])
        out["jpeg"].append(frame.data if frame is not None and not error else None)
        out["image_height"].append(shape[0])
        out["image_width"].append(shape[1])
        for column in IDENTITY_COLUMNS:
            out[column].append(ident[column])
        out["source_size"].append(int(size))
        out["source_mtime_ns"].append(int(mtime))
        out["source_etag"].append(etag if isinstance(etag, str) else None)
        out["source_version_id"].append(version_id if isinstance(version_id, str) else None)
    if len(unreadable) >= 2 and len(unreadable) > max_unreadable_share * len(batch["uri"]):
        first_uri, first_error = unreadable[0]
        raise StorageOutage(f"storage failed for {len(unreadable)} of {len(batch['uri'])} inputs of a batch "
                            f"after retries; first {first_uri}: {first_error}")
    n = len(out["uri"])
    columns = {"uri": np.array(out["uri"], dtype=object), "sha256": np.array(out["sha256"], dtype=object),
               "status": np.array(out["status"], dtype=object), "error": np.array(out["error"], dtype=object),
               "source_size": np.array(out["source_size"], np.int64),
               "source_mtime_ns": np.array(out["source_mtime_ns"], np.int64),
               "source_etag": np.array(out["source_etag"], dtype=object),
               "source_version_id": np.array(out["source_version_id"], dtype=object),
               "skip_reason": np.array(out["skip_reason"], dtype=object),
               # -1: not decoded (an error or a skipped input); object arrays of None lose their type in Ray
               "image_height": np.array([-1 if v is None else v for v in out["image_height"]], np.int32),
               "image_width": np.array([-1 if v is None else v for v in out["image_width"]], np.int32),
               **{c: np.array(out[c], dtype=object) for c in IDENTITY_COLUMNS},
               "image": np.stack(out["image"]) if n else np.zeros((0, sizes[0], sizes[0]), np.uint8)}
    if sizes[1]:
        columns["seg_image"] = np.stack(out["seg_image"]) if n else np.zeros((0, sizes[1], sizes[1]), np.uint8)
    if device_jpeg:     # b"": decoded here (never None, which Ray would type as null in some blocks)
        columns["jpeg"] = np.array([f or b"" for f in out["jpeg"]], dtype=object)
    return columns


# --- stage 2: models (an actor pool) ------------------------------------------------------------

class ScoringPredictor:
    """Loads the pinned models once, as a ``cxr.screen.Screen``; maps a batch of decoded
    images to score rows (the screen's fields plus lineage)."""

    def __init__(self, tracking_uri: str, segmenter: dict | None, classifier: dict, heatmap_size: int,
                 quality: dict, job_id: str, threads: int = 1, use_gpu: bool = False, cpu_bf16: bool = False):
        import torch

        from cxr import tracking
        from cxr.screen import QualityLimits, Screen

        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.seg_ref = ModelRef(**segmenter) if segmenter else None
        self.cls_ref = ModelRef(**classifier)
        self.screen = Screen(
            tracking.load_registered(tracking_uri, self.cls_ref.pinned_uri),
            tracking.load_registered(tracking_uri, self.seg_ref.pinned_uri) if self.seg_ref else None,
            device, QualityLimits(**quality), bf16=device.type == "cuda" or cpu_bf16)
        self.heatmap_size = heatmap_size
        self.job_id = job_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        # An error row's reason is never empty (None would read as "ok").
        errors = [(e or "unreadable") if s == "error" else None for s, e in zip(batch["status"], _strings(batch["error"]))]
        skipped = [(r or "skipped") if s == "skipped" else None
                   for s, r in zip(batch["status"], _strings(batch["skip_reason"]))]
        images, seg_images = self._device_decoded(batch, errors)
        columns = self.screen.rows(list(batch["uri"]), _strings(batch["sha256"]), errors, images, seg_images,
                                   self.heatmap_size, skipped, _strings(batch["patient_age"]))
        seg, cls = self.seg_ref, self.cls_ref
        now = datetime.now(timezone.utc)
        # An Arrow table built against SCHEMA, not a dict of object arrays: Ray would pickle
        # list and bytes columns into opaque binary in some blocks.
        return pa.Table.from_pydict({
            **columns,
            "segmenter_name": [seg.name if seg else None] * n, "segmenter_version": [seg.version if seg else None] * n,
            "segmenter_alias": [seg.alias if seg else None] * n, "segmenter_run_id": [seg.run_id if seg else None] * n,
            "classifier_name": [cls.name] * n, "classifier_version": [cls.version] * n,
            "classifier_alias": [cls.alias] * n, "classifier_run_id": [cls.run_id] * n,
            "preprocess_version": [PREPROCESS_VERSION] * n, "schema_version": [SCHEMA_VERSION] * n,
            "job_id": [self.job_id] * n, "scored_at": [now] * n,
            "source_size": [int(v) for v in batch["source_size"]],
            "source_mtime_ns": [int(v) for v in batch["source_mtime_ns"]],
            "source_etag": _strings(batch["source_etag"]), "source_version_id": _strings(batch["source_version_id"]),
            "image_height": [int(v) if v > 0 else None for v in batch["image_height"]],
            "image_width": [int(v) if v > 0 else None for v in batch["image_width"]],
            **{c: _strings(batch[c]) for c in IDENTITY_COLUMNS},
        }, schema=SCHEMA)


    def _device_decoded(self, batch: dict[str, np.ndarray], errors: list[str | None]):
        """The batch's images with the frames the decode tasks left in ``jpeg`` decoded on the
        screen's device (``cxr.data.gpu_decode``); a frame that fails is its input's error."""
        images, seg_images = batch["image"], batch.get("seg_image")
        pending = [i for i, f in enumerate(batch.get("jpeg", ())) if isinstance(f, bytes) and f and errors[i] is None]
        if not pending:
            return images, seg_images
        from cxr.data.gpu_decode import decode_letterboxed

        prep = self.screen.preprocess
        boxed, seg_boxed, failed = decode_letterboxed([batch["jpeg"][i] for i in pending], prep.sizes,
                                                      prep.prep.letterbox_fill, self.screen.device)
        images = np.array(images, copy=True)
        seg_images = np.array(seg_images, copy=True) if seg_images is not None else None
        for j, i in enumerate(pending):
            if failed[j]:
                errors[i] = failed[j]
                continue
            images[i] = boxed[j]
            if seg_images is not None:
                seg_images[i] = seg_boxed[j]
        return images, seg_images


def _strings(values: np.ndarray) -> list[str | None]:
    """Nullable strings from a batch column (Ray may hand a null over as NaN)."""
    return [v if isinstance(v, str) else None for v in values]
