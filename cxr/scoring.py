"""The Ray Data scoring pipeline: inputs -> bytes -> decoded, letterboxed images (CPU tasks) ->
segment, mask, classify and Grad-CAM (one actor pool) -> Parquet, committed atomically.

Exactly-once: an input is (uri, source_size, source_mtime_ns), what a listing gives without
opening it, scored once per (segmenter version, classifier version) pair. A run anti-joins its
listing against those columns of the rows already committed (``new_work``), so a rerun reads
no byte of what it scored, and a run killed at any point, started again, fills exactly the
gaps. Rows written before version 3 have no listing columns: for them the old key, (uri,
sha256) after reading the bytes, still applies (``legacy_keys``). Each write task commits one file: written under ``_tmp/`` and renamed
into place on local disk, or one S3 PUT, which S3 makes visible only when complete. Readers
(pyarrow datasets) ignore files whose names start with ``_``, so they never see a half-written part.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from cxr.data.decode import DecodeLimits, decode_image
from cxr.data.errors import BadImageError, describe
from cxr.data.letterbox import letterbox_pair
from cxr.data.storage import StorageConfig, filesystem_for, is_s3, read_bytes
from cxr.preprocess import PREPROCESS_VERSION

log = logging.getLogger(__name__)

# Bump SCHEMA_VERSION on any change to SCHEMA; docs/SCORES.md documents each version.
SCHEMA_VERSION = "3"
SCHEMA = pa.schema([
    ("uri", pa.string()), ("sha256", pa.string()),
    ("status", pa.string()),                     # ok | flagged | error
    ("error", pa.string()),
    ("labels", pa.list_(pa.string())), ("probabilities", pa.list_(pa.float32())),
    ("predicted_label", pa.string()), ("covid_probability", pa.float32()),
    ("covid_threshold", pa.float32()), ("screen_positive", pa.bool_()),      # added in version 2
    ("heatmap_png", pa.binary()), ("heatmap_size", pa.int32()),
    ("lung_fraction", pa.float32()), ("qc_flags", pa.list_(pa.string())),
    ("segmenter_name", pa.string()), ("segmenter_version", pa.string()), ("segmenter_alias", pa.string()),
    ("segmenter_run_id", pa.string()),
    ("classifier_name", pa.string()), ("classifier_version", pa.string()), ("classifier_alias", pa.string()),
    ("classifier_run_id", pa.string()),
    ("preprocess_version", pa.string()), ("schema_version", pa.string()),
    ("job_id", pa.string()), ("scored_at", pa.timestamp("ms", tz="UTC")),
    ("source_size", pa.int64()), ("source_mtime_ns", pa.int64()),   # added in version 3
])
TMP_DIR = "_tmp"
PARTITION = pa.schema([("scored_date", pa.string())])


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


def key(uri: str, sha256: str | None) -> str:
    return f"{uri}\t{sha256 or ''}"


# --- reading what was scored ------------------------------------------------------------------

def read_scores(output: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every committed row under ``output`` (with its ``scored_date`` partition); empty if none."""
    fs, path = filesystem_for(output, storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return SCHEMA.empty_table()
    # The current schema, given explicitly: parts written under an older version read with
    # nulls in the columns added since, whichever part the dataset happens to open first.
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=pa.unify_schemas([SCHEMA, PARTITION]),
                           partitioning=pads.partitioning(PARTITION, flavor="hive"))
    if not dataset.files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return dataset.to_table(columns=columns)


def committed(output: str, segmenter: ModelRef | None, classifier: ModelRef,
              storage: StorageConfig | None = None) -> pa.Table:
    """The listing columns (and sha256) of the rows committed for this pair of model versions
    that count as scored: every row but a storage error's, which the next run tries again.
    Parquet is columnar, so the heatmaps are never read. Read once per run, for ``new_work``
    and ``legacy_keys`` both."""
    columns = ["uri", "sha256", "source_size", "source_mtime_ns", "segmenter_version", "classifier_version", "error",
               "scored_at"]
    table = read_scores(output, storage, columns)
    if table.num_rows == 0:
        return table
    same_segmenter = (pc.is_null(table["segmenter_version"]) if segmenter is None
                      else pc.equal(table["segmenter_version"], segmenter.version))
    retried = pc.fill_null(pc.or_(*[pc.starts_with(table["error"], p) for p in STORAGE_ERRORS]), False)
    keep = pc.and_(pc.and_(pc.fill_null(same_segmenter, False),
                           pc.fill_null(pc.equal(table["classifier_version"], classifier.version), False)),
                   pc.invert(retried))
    return table.filter(keep)


def new_work(listing: pa.Table, done: pa.Table) -> pa.Table:
    """The listing rows (``ENTRY_SCHEMA``) not among ``done`` (``committed``): an anti-join on
    (uri, source_size, source_mtime_ns), vectorised in Arrow. A changed file (new size or
    time) is new work."""
    if done.num_rows == 0:
        return listing
    keys = ["uri", "source_size", "source_mtime_ns"]
    new = listing.join(done.filter(pc.is_valid(done["source_size"])).select(keys), keys=keys, join_type="left anti")
    # Rows from before version 3 have no listing columns: their input counts as done when it
    # was last modified before it was scored (then the bytes scored are the bytes there now).
    legacy = done.filter(pc.is_null(done["source_size"])).select(["uri", "scored_at"])
    if legacy.num_rows and new.num_rows:
        legacy = legacy.group_by("uri").aggregate([("scored_at", "max")]).rename_columns(["uri", "scored_at"])
        matched = new.join(legacy, keys="uri", join_type="inner")
        scored_ns = pc.multiply(pc.cast(pc.cast(matched["scored_at"], pa.timestamp("ms")), pa.int64()), 1_000_000)
        unchanged = matched.filter(pc.less_equal(matched["source_mtime_ns"], scored_ns)).select(["uri"])
        new = new.join(unchanged, keys="uri", join_type="left anti")
    return new.sort_by("uri")


def legacy_keys(done: pa.Table) -> set[str]:
    """(uri, sha256) keys of the ``committed`` rows written before schema version 3 (no listing
    columns), for the decode tasks to skip after hashing, as they did then. Empty for outputs
    written since."""
    if done.num_rows == 0:
        return set()
    old = done.filter(pc.is_null(done["source_size"]))
    # A row without sha256 (a file too large to read) has the key "uri\t", as decode_batch makes it.
    return {key(u, s) for u, s in zip(old["uri"].to_pylist(), old["sha256"].to_pylist())}


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
                 max_bytes: int, storage: StorageConfig | None,
                 max_unreadable_share: float = 0.5) -> dict[str, np.ndarray]:
    """Read, hash, decode and letterbox each input at the classifier's and the segmenter's size
    (``cxr.screen.letterbox_pair``, the CPU half of the model's ``Preprocess``).

    Inputs whose key is in ``skip`` are dropped. Whatever goes wrong with one input (a bad
    file, an odd DICOM header, an unsupported URI, an object the store refuses) is that input's
    ``error`` row with the reason; it never fails the batch. Only when storage errors hit more
    than ``max_unreadable_share`` of the batch (and at least 2 inputs) does the batch fail with
    ``StorageOutage``, naming the first input and its error: that is the store, not the files,
    and writing no rows lets the next run score them.
    """
    limits = DecodeLimits(max_bytes=max_bytes)
    out = {"uri": [], "sha256": [], "status": [], "error": [], "image": [], "seg_image": [],
           "source_size": [], "source_mtime_ns": []}
    blank = tuple(np.zeros((s, s), np.uint8) if s else None for s in sizes)
    unreadable: list[tuple[str, str]] = []
    n_in = len(batch["uri"])
    sizes_in = batch.get("source_size", np.full(n_in, -1, np.int64))
    mtimes_in = batch.get("source_mtime_ns", np.zeros(n_in, np.int64))
    for uri, size, mtime in zip(batch["uri"], sizes_in, mtimes_in):
        uri = str(uri)
        sha, error, images = None, None, blank
        try:
            data = read_bytes(uri, storage, max_bytes)
            sha = hashlib.sha256(data).hexdigest()
            if key(uri, sha) in skip:
                continue
            images = letterbox_pair(decode_image(data, uri, limits), sizes, fill)
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
        out["status"].append("error" if error else "ok")
        out["error"].append(error)
        out["image"].append(images[0])
        out["seg_image"].append(images[1])
        out["source_size"].append(int(size))
        out["source_mtime_ns"].append(int(mtime))
    if len(unreadable) >= 2 and len(unreadable) > max_unreadable_share * len(batch["uri"]):
        first_uri, first_error = unreadable[0]
        raise StorageOutage(f"storage failed for {len(unreadable)} of {len(batch['uri'])} inputs of a batch "
                            f"after retries; first {first_uri}: {first_error}")
    n = len(out["uri"])
    columns = {"uri": np.array(out["uri"], dtype=object), "sha256": np.array(out["sha256"], dtype=object),
               "status": np.array(out["status"], dtype=object), "error": np.array(out["error"], dtype=object),
               "source_size": np.array(out["source_size"], np.int64),
               "source_mtime_ns": np.array(out["source_mtime_ns"], np.int64),
               "image": np.stack(out["image"]) if n else np.zeros((0, sizes[0], sizes[0]), np.uint8)}
    if sizes[1]:
        columns["seg_image"] = np.stack(out["seg_image"]) if n else np.zeros((0, sizes[1], sizes[1]), np.uint8)
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
        columns = self.screen.rows(list(batch["uri"]), _strings(batch["sha256"]), errors, batch["image"],
                                   batch.get("seg_image"), self.heatmap_size)
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
        }, schema=SCHEMA)


def _strings(values: np.ndarray) -> list[str | None]:
    """Nullable strings from a batch column (Ray may hand a null over as NaN)."""
    return [v if isinstance(v, str) else None for v in values]


# --- stage 3: atomic Parquet commits -------------------------------------------------------------

def to_schema(table: pa.Table) -> pa.Table:
    """Columns in SCHEMA order and types (Ray may reorder columns or widen string types)."""
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in SCHEMA], schema=SCHEMA)


class AtomicParquetSink(Datasink):
    """A Ray Data datasink: each write task commits one Parquet file under
    ``output/scored_date=DATE/``, named by a digest of its rows' keys, so a retried task rewrites
    the same file instead of adding a duplicate."""

    def __init__(self, output: str, run_date: str, job_id: str, storage: StorageConfig | None):
        self.output, self.run_date, self.job_id, self.storage = output.rstrip("/"), run_date, job_id, storage

    def write(self, blocks: Iterable[pa.Table], ctx) -> int:
        tables = [to_schema(b) for b in blocks if b.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        digest = hashlib.sha1("\n".join(sorted(key(u, s) for u, s in zip(
            table.column("uri").to_pylist(), table.column("sha256").to_pylist()))).encode()).hexdigest()[:16]
        fs, root = filesystem_for(self.output, self.storage)
        final = f"{root}/scored_date={self.run_date}/part-{self.job_id}-{digest}.parquet"
        fs.create_dir(f"{root}/scored_date={self.run_date}", recursive=True)
        if is_s3(self.output):
            pq.write_table(table, final, filesystem=fs)   # one object, visible only when complete
        else:
            tmp = f"{root}/{TMP_DIR}/_{uuid.uuid4().hex}.parquet"   # "_": readers skip it
            fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, final)                           # rename(2): atomic on one filesystem
        return table.num_rows

