"""The scores table: Parquet parts under ``OUTPUT/scored_date=DATE/`` that Spark, Trino, DuckDB
and pyarrow read as they are; how they are committed, read, and compacted.

- **Commit.** Each part is committed whole by the one write task that wrote it: written under
  ``_tmp/`` and renamed into place on local disk, or one S3 PUT, which S3 makes visible only
  when complete. A part holds at least ``rows_per_file`` rows (Ray Data buffers blocks up to
  that), not one model batch, so the file count follows the rows.
- **History and current rows.** Rows are never rewritten in place: a changed input or a model
  change adds a row, and the input's *current* row is its newest (``current_rows``); the older
  ones stay as history. In SQL: ``QUALIFY row_number() OVER (PARTITION BY uri ORDER BY
  scored_at DESC, job_id DESC) = 1`` (docs/SCORES.md).
- **Compaction** (``compact``) merges small parts of a date into parts of ``target_rows``. Its
  one commit-log record, ``_compactions/ID.json`` (the sources and the merged part), is written
  before the merged part appears and deleted after the sources are gone. Readers here skip
  the sources of a record whose merged part exists, so a compaction killed at any point never
  shows a row twice; the next compaction (or scoring job) finishes or abandons it.
Names starting with ``_`` (``_tmp``, ``_lease``, ``_compactions``) are skipped by every reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from cxr.data.dicom_header import IDENTITY_COLUMNS
from cxr.data.storage import StorageConfig, filesystem_for
from cxr.qc import SIGNALS as QC_SIGNALS

log = logging.getLogger(__name__)

# Bump SCHEMA_VERSION on any change to SCHEMA; docs/SCORES.md documents each version.
SCHEMA_VERSION = "7"
SCHEMA = pa.schema([
    ("uri", pa.string()), ("sha256", pa.string()),
    ("status", pa.string()),                     # ok | flagged | skipped (version 5) | error
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
    ("source_etag", pa.string()), ("source_version_id", pa.string()),   # added in version 4
    # added in version 5: why an input was routed out, its decoded size, and a DICOM's identity
    ("skip_reason", pa.string()), ("image_height", pa.int32()), ("image_width", pa.int32()),
    ("heatmap_label", pa.string()), ("heatmap_scale", pa.float32()),
    ("covid_heatmap_png", pa.binary()), ("covid_heatmap_scale", pa.float32()), ("lung_mask_png", pa.binary()),
    *((column, pa.string()) for column in IDENTITY_COLUMNS),
    # added in version 6: the most probable class (predicted_label follows the screen's label
    # rule), and each quality flag with the score that raised it and the threshold it crossed
    ("argmax_label", pa.string()),
    ("qc_scores", pa.list_(pa.struct([("flag", pa.string()), ("score", pa.float32()), ("threshold", pa.float32())]))),
    # added in version 7: every quality-control score of a scored row, flag or not (what a
    # night's drift is measured on: cxr.monitoring)
    ("qc_signals", pa.struct([(name, pa.float32()) for name in QC_SIGNALS])),
])
PARTITION = pa.schema([("scored_date", pa.string())])
SCORED_STATUSES = ("ok", "flagged")      # run through the models (skipped and error rows were not)
TMP_DIR = "_tmp"
COMPACTION_DIR = "_compactions"


def key(uri: str, sha256: str | None) -> str:
    return f"{uri}\t{sha256 or ''}"


def to_schema(table: pa.Table) -> pa.Table:
    """Columns in SCHEMA order and types (Ray may reorder columns or widen string types);
    a column the table lacks (an older part) comes as nulls."""
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) if f.name in table.column_names
                                 else pa.nulls(table.num_rows, f.type) for f in SCHEMA], schema=SCHEMA)


# --- reading ----------------------------------------------------------------------------------

def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def _pending_compactions(fs: pafs.FileSystem, root: str) -> list[tuple[str, dict | None]]:
    """(path, record) of each compaction record; record None if it is not readable: it was
    written whole before its merged part, so such a record never had a merged part."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{COMPACTION_DIR}", allow_not_found=True))
    pending = []
    for info in sorted((i for i in infos if i.path.endswith(".json")), key=lambda i: i.path):
        try:
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read())
            pending.append((info.path, record if isinstance(record, dict) and "sources" in record else None))
        except FileNotFoundError:        # finished meanwhile
            continue
        except ValueError:
            pending.append((info.path, None))
    return pending


def live_files(output: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str, list[str]]:
    """The filesystem, the table's root and its committed parts: every ``.parquet`` file outside
    ``_``-folders, less the sources of a compaction whose merged part is already there."""
    fs, root = filesystem_for(output, storage)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))   # [] if no table
    files = {i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
             and not _hidden(os.path.relpath(i.path, root))}
    for _, record in _pending_compactions(fs, root):
        if record and f"{root}/{record['target']}" in files:
            files -= {f"{root}/{s}" for s in record["sources"]}
    return fs, root, sorted(files)


def read_scores(output: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
                filter: pc.Expression | None = None) -> pa.Table:
    """The committed rows under ``output``, history included (with the ``scored_date``
    partition column); empty if none. ``columns`` and ``filter`` are pushed down to Parquet:
    the heatmaps are read only when asked for."""
    for attempt in range(3):
        fs, root, files = live_files(output, storage)
        if not files:
            empty = pa.unify_schemas([SCHEMA, PARTITION]).empty_table()
            return empty if columns is None else empty.select(columns)
        dataset = scores_dataset(fs, root, files)
        try:
            return dataset.to_table(columns=columns, filter=filter)
        except FileNotFoundError:
            if attempt == 2:
                raise
            # A compaction deleted a part merged elsewhere after it was listed: list again.


def scores_dataset(fs: pafs.FileSystem, root: str, files: list[str]) -> pads.Dataset:
    """The committed parts (``live_files``) as one dataset, read lazily (DuckDB and Arrow scan
    it a batch at a time). The current schema is given explicitly: parts written under an older
    version read with nulls in the columns added since, whichever part is opened first."""
    return pads.dataset(files, filesystem=fs, format="parquet", schema=pa.unify_schemas([SCHEMA, PARTITION]),
                        partitioning=pads.partitioning(PARTITION, flavor="hive"), partition_base_dir=root)


def current_rows(table: pa.Table) -> pa.Table:
    """Each uri's newest row (latest ``scored_at``, then ``job_id``): the input's current result.
    The table needs ``uri``, ``scored_at`` and ``job_id``."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("uri", "ascending"), ("scored_at", "descending"),
                                              ("job_id", "descending")])
    uris = pc.take(table["uri"], order)
    # First of each run of equal uris in sorted order. Vectorised in Arrow: a Python loop over
    # a million rows would take seconds.
    first = np.ones(len(uris), bool)
    if len(uris) > 1:
        first[1:] = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1)).to_numpy(zero_copy_only=False)
    return table.take(pc.filter(order, pa.array(first)))


DUCKDB_MEMORY = "256MB"     # DuckDB's share of a driver that must stay within 1 GiB at any table size


@contextlib.contextmanager
def scratch_duckdb(memory_limit: str = DUCKDB_MEMORY):
    """A DuckDB connection on a database file in a scratch folder, held to ``memory_limit``:
    what does not fit spills to that folder, which is removed afterwards."""
    import duckdb

    with tempfile.TemporaryDirectory(prefix="cxr-duckdb-") as scratch:
        con = duckdb.connect(os.path.join(scratch, "scratch.duckdb"))
        try:
            con.execute(f"SET memory_limit = '{memory_limit}'")
            con.execute(f"SET temp_directory = '{scratch}'")
            con.execute("SET preserve_insertion_order = false")
            # DuckDB wants about 100 MB per thread for joins and windows: on a large node its
            # default (every core) would not fit the limit.
            con.execute(f"SET threads = {max(1, min(4, os.cpu_count() or 1))}")
            con.execute("SET enable_progress_bar = false")      # a job's output is its own summary
            con.execute("SET TimeZone = 'UTC'")                 # timestamps as the table stores them
            yield con
        finally:
            con.close()


CURRENT_ORDER = "PARTITION BY uri ORDER BY scored_at DESC NULLS LAST, job_id DESC NULLS LAST"


def scan_parts(fs: pafs.FileSystem, root: str, files: list[str], columns: list[str],
               batch_rows: int = 65_536) -> pa.RecordBatchReader:
    """The parts' (``live_files``) ``columns`` (``SCHEMA`` types; ``scored_date`` from the path;
    a column an older part lacks as nulls), one part at a time, a batch at a time. By hand
    rather than Arrow's dataset scanner, which kept about 15 MB per million rows read (0.66 GiB
    after 30 million, against 0.24 part by part)."""
    full = pa.unify_schemas([SCHEMA, PARTITION])
    target = pa.schema([full.field(c) for c in columns])

    def batches() -> Iterator[pa.RecordBatch]:
        for path in files:
            date = next((p.split("=", 1)[1] for p in os.path.relpath(path, root).split("/")
                         if p.startswith("scored_date=")), None)
            with fs.open_input_file(path) as handle:
                part = pq.ParquetFile(handle)
                present = [c for c in columns if c in part.schema_arrow.names]
                for batch in part.iter_batches(batch_size=batch_rows, columns=present):
                    yield pa.RecordBatch.from_arrays(
                        [batch.column(c).cast(target.field(c).type) if c in present
                         else pa.array([date] * batch.num_rows, pa.string()) if c == "scored_date"
                         else pa.nulls(batch.num_rows, target.field(c).type) for c in columns], schema=target)

    return pa.RecordBatchReader.from_batches(target, batches())


def register_scores(con, output: str, storage: StorageConfig | None, columns: list[str]) -> bool:
    """The committed parts' ``columns`` as DuckDB's table ``scores``, streamed once
    (``scan_parts``); False where nothing is committed. Streamed from Python, not registered
    as a dataset: DuckDB cannot spill the read-ahead it pins (at 10 million rows it ran out of a
    256 MB limit), and its own S3 reader is an extension it would download."""
    fs, root, files = live_files(output, storage)
    if not files:
        return False
    con.register("scores", scan_parts(fs, root, files, list(dict.fromkeys(columns))))
    return True


def current_batches(output: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
                    batch_rows: int = 100_000) -> Iterator[pa.RecordBatch]:
    """Every input's current row (as ``read_current``), a batch at a time, in bounded memory at
    any table size: DuckDB picks each uri's newest row over the committed parts, spilling to
    disk beyond its memory limit. In no particular order."""
    wanted = columns or SCHEMA.names + PARTITION.names
    target = pa.schema([pa.unify_schemas([SCHEMA, PARTITION]).field(c) for c in wanted])
    with scratch_duckdb() as con:
        if not register_scores(con, output, storage, [*wanted, "uri", "scored_at", "job_id"]):
            return
        projection = ", ".join(f'"{c}"' for c in wanted)
        # con.sql streams its result; con.execute would hold all of it before the first batch.
        for batch in con.sql(f"SELECT {projection} FROM scores QUALIFY row_number() OVER ({CURRENT_ORDER}) = 1"
                             ).to_arrow_reader(batch_rows):
            yield batch.cast(target)         # read_current's types (DuckDB's lists and timestamps differ)


def read_current(output: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """The current row of every input (``current_rows`` of ``read_scores``)."""
    wanted = columns or SCHEMA.names + PARTITION.names
    needed = list(dict.fromkeys([*wanted, "uri", "scored_at", "job_id"]))
    return current_rows(read_scores(output, storage, needed)).select(wanted)


def rows_for(output: str, job_id: str | None, storage: StorageConfig | None = None,
             columns: list[str] | None = None) -> pa.Table:
    """The rows a review or an export covers: ``job_id`` None, the latest night (the current row
    of every input scored on the latest date, whichever jobs wrote them: a killed run resumed is
    several jobs); "all", every input's current row; else that job's rows."""
    import pyarrow.dataset as ds_

    wanted = list(dict.fromkeys([*(columns or SCHEMA.names), "uri", "scored_at", "job_id", "scored_date"]))
    if job_id not in (None, "all"):
        return read_scores(output, storage, wanted, filter=ds_.field("job_id") == job_id)
    rows = current_rows(read_scores(output, storage, wanted))
    if job_id is None and rows.num_rows:
        rows = rows.filter(pc.equal(rows["scored_date"], pc.max(rows["scored_date"])))
    return rows


def latest_job(output: str, storage: StorageConfig | None = None) -> str | None:
    """The job id of the newest row (two columns read)."""
    jobs = read_scores(output, storage, ["job_id", "scored_at"])
    if jobs.num_rows == 0:
        return None
    return jobs.take(pc.sort_indices(jobs, sort_keys=[("scored_at", "descending"), ("job_id", "descending")])[:1])[
        "job_id"][0].as_py()


# --- writing ----------------------------------------------------------------------------------

def write_part(fs: pafs.FileSystem, root: str, relative: str, table: pa.Table) -> None:
    """Commit one part whole: one PUT on S3 (visible only when complete); elsewhere a ``_tmp``
    file renamed into place (rename(2) is atomic on one filesystem)."""
    final = f"{root}/{relative}"
    fs.create_dir(os.path.dirname(final), recursive=True)
    # Sorted by job and uri, so a reader's filter on job_id skips row groups by their statistics.
    table = table.sort_by([("job_id", "ascending"), ("uri", "ascending")])
    if isinstance(fs, pafs.S3FileSystem):
        pq.write_table(table, final, filesystem=fs, row_group_size=4096)
        return
    tmp = f"{root}/{TMP_DIR}/_{uuid.uuid4().hex}.parquet"
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    pq.write_table(table, tmp, filesystem=fs, row_group_size=4096)
    fs.move(tmp, final)


def _write_whole(fs: pafs.FileSystem, root: str, path: str, data: bytes) -> None:
    """A small file that appears complete or not at all (one PUT on S3; a rename elsewhere)."""
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{root}/{TMP_DIR}/_{uuid.uuid4().hex}"
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def clear_scratch(output: str, storage: StorageConfig | None = None) -> int:
    """Delete what killed writers left under ``_tmp/`` (local disk: S3 parts have no scratch).
    Call it holding the output's lease, before writing: then nothing there is in use."""
    fs, root = filesystem_for(output, storage)
    infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{TMP_DIR}", allow_not_found=True))
    left = [i.path for i in infos if i.type == pafs.FileType.File]
    for path in left:
        fs.delete_file(path)
    return len(left)


def part_summary(table: pa.Table) -> dict:
    """What a part holds, counted where it was written: the job's summary adds these up
    instead of reading its output again."""
    return {"rows": table.num_rows,
            "status": dict(Counter(table["status"].to_pylist())),
            "label": dict(Counter(v for v in table["predicted_label"].to_pylist() if v is not None)),
            "screen_positive": int(pc.sum(pc.fill_null(table["screen_positive"], False).cast(pa.int64())).as_py() or 0)}


class AtomicParquetSink(Datasink):
    """A Ray Data datasink: each write task commits one part under ``scored_date=DATE/`` of at
    least ``rows_per_file`` rows (the last may hold fewer), named by a digest of its rows' keys,
    so a retried task rewrites the same file instead of adding a duplicate. ``summary`` holds
    what the job wrote, by part, once the write completes."""

    def __init__(self, output: str, run_date: str, job_id: str, storage: StorageConfig | None,
                 rows_per_file: int = 512):
        self.output, self.run_date, self.job_id, self.storage = output.rstrip("/"), run_date, job_id, storage
        self.rows_per_file = rows_per_file
        self.summary: dict[str, dict] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict | None:
        tables = [to_schema(b) for b in blocks if b.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables)
        digest = hashlib.sha1("\n".join(sorted(key(u, s) for u, s in zip(
            table.column("uri").to_pylist(), table.column("sha256").to_pylist()))).encode()).hexdigest()[:16]
        relative = f"scored_date={self.run_date}/part-{self.job_id}-{digest}.parquet"
        fs, root = filesystem_for(self.output, self.storage)
        write_part(fs, root, relative, table)
        return {"file": relative, **part_summary(table)}

    def on_write_complete(self, write_result) -> None:
        # Keyed by file: a write task Ray retried counts once, as its file exists once.
        self.summary = {r["file"]: r for r in write_result.write_returns if r}


def add_up(parts: Iterable[dict]) -> dict:
    """One summary of ``part_summary`` dicts."""
    status, label, rows, positive = Counter(), Counter(), 0, 0
    for p in parts:
        status.update(p["status"])
        label.update(p["label"])
        rows += p["rows"]
        positive += p["screen_positive"]
    return {"rows": rows, "status": dict(status), "label": dict(label), "screen_positive": positive}


# --- compaction -------------------------------------------------------------------------------

def finish_compactions(output: str, storage: StorageConfig | None = None) -> int:
    """Complete or abandon compactions a killed process left: where the merged part exists,
    delete what is left of its sources; otherwise the sources are still the truth. Then drop
    the record. Call it holding the output's lease. Returns how many records it closed."""
    fs, root = filesystem_for(output, storage)
    root = root.rstrip("/")
    pending = _pending_compactions(fs, root)
    for path, record in pending:
        if record and fs.get_file_info(f"{root}/{record['target']}").type == pafs.FileType.File:
            for source in record["sources"]:
                if fs.get_file_info(f"{root}/{source}").type == pafs.FileType.File:
                    fs.delete_file(f"{root}/{source}")
        fs.delete_file(path)
    return len(pending)


def compact(output: str, storage: StorageConfig | None = None, target_rows: int = 50_000) -> dict:
    """Merge the parts of each date that hold fewer than half of ``target_rows`` into parts of
    about ``target_rows`` rows. Rows are copied unchanged (history included). Call it holding
    the output's lease. Returns {"before": files, "after": files, "merged": groups}."""
    finish_compactions(output, storage)
    fs, root, files = live_files(output, storage)
    by_date: dict[str, list[tuple[str, int]]] = {}
    for path in files:
        relative = os.path.relpath(path, root)
        rows = pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
        if rows < target_rows // 2:
            by_date.setdefault(os.path.dirname(relative), []).append((relative, rows))
    merged = 0
    for folder, small in sorted(by_date.items()):
        groups, group, count = [], [], 0
        for relative, rows in small:
            if group and count + rows > target_rows:
                groups.append(group)
                group, count = [], 0
            group.append(relative)
            count += rows
        groups.append(group)
        for sources in (g for g in groups if len(g) > 1):
            digest = hashlib.sha1("\n".join(sorted(sources)).encode()).hexdigest()[:16]
            target = f"{folder}/part-compacted-{digest}.parquet"
            record = f"{root}/{COMPACTION_DIR}/{digest}.json"
            fs.create_dir(f"{root}/{COMPACTION_DIR}", recursive=True)
            _write_whole(fs, root, record, json.dumps({"sources": sources, "target": target}).encode())
            table = pa.concat_tables(to_schema(pq.read_table(f"{root}/{s}", filesystem=fs)) for s in sources)
            write_part(fs, root, target, table)
            for source in sources:
                fs.delete_file(f"{root}/{source}")
            fs.delete_file(record)
            merged += 1
    after = len(live_files(output, storage)[2])
    log.info("compacted %s: %d parts -> %d", output, len(files), after)
    return {"before": len(files), "after": after, "merged": merged}
