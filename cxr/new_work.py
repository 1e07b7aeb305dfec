"""Deciding what a scoring run has to do, in bounded memory, at any archive size.

An input is (uri, source_size, source_mtime_ns), what a listing gives without opening it. Its
current row (the newest of its rows in the scores table) says by which pair of model versions
it was scored. The new work is the listing anti-joined against the current rows of these
models, a rerun reads no byte of what it scored, and a run killed at any point, started again,
fills exactly the gaps. A changed input, or one scored by other model versions, gets a new row
that becomes its current one. Rows written before schema version 3 have no listing columns:
for them the old key, (uri, sha256) after reading the bytes, still applies (``Decision.skip``).

The join runs in DuckDB over a database file in a scratch folder, with a memory limit: the
listing is streamed in (``cxr.data.storage.entry_batches``), the committed parts are scanned a
batch at a time (``cxr.scores_table.scores_dataset``), and what does not fit the limit spills
to disk. Only the new work comes back into Python, so the driver's memory follows the new work,
not the archive (an in-memory Arrow join held 5.9 GiB at 10 million inputs). DuckDB rather than
a hand-written hash partitioning: it partitions, spills and joins on all cores already.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from cxr.data.storage import ENTRY_SCHEMA, StorageConfig
from cxr.scores_table import (CURRENT_ORDER, DUCKDB_MEMORY, current_rows, key, read_scores, register_scores,
                              scratch_duckdb)
from cxr.scoring import STORAGE_ERRORS, ModelRef

@dataclass(frozen=True)
class Decision:
    listed: int             # inputs in the listing
    unscored: int           # of those, not scored by these models (before --limit)
    inputs: pa.Table        # those to score now (``ENTRY_SCHEMA``, by uri): at most ``limit``
    why: dict[str, int]     # why ``inputs`` are scored: new, changed, retry, backfill
    skip: set[str]          # (uri, sha256) keys of rows from before schema version 3


def decide(listing: Iterable[pa.RecordBatch] | pa.Table, output: str, segmenter: ModelRef | None,
           classifier: ModelRef, storage: StorageConfig | None = None, limit: int | None = None,
           memory_limit: str = DUCKDB_MEMORY) -> Decision:
    """What to score of ``listing`` (``ENTRY_SCHEMA`` batches, in any order, each uri once)
    given what is committed in ``output``.

    ``why`` counts, for the inputs to score now: ``new`` (never scored), ``changed`` (size or
    time differ from its current row's), ``retry`` (its current row is a storage error, which
    never counts as scored) and ``backfill`` (unchanged, scored by other model versions)."""
    batches = listing.to_batches() if isinstance(listing, pa.Table) else listing
    if importlib.util.find_spec("duckdb") is None:
        # Where DuckDB is not installed (the GPU machine's staged wheels): the same decision
        # in memory with Arrow, fine for the thousands of inputs a benchmark lists there.
        table = pa.Table.from_batches([b.cast(ENTRY_SCHEMA) for b in batches], schema=ENTRY_SCHEMA)
        return _decide_in_memory(table, output, segmenter, classifier, storage, limit)
    reader = pa.RecordBatchReader.from_batches(ENTRY_SCHEMA, (b.cast(ENTRY_SCHEMA) for b in batches))
    with scratch_duckdb(memory_limit) as con:
        con.register("listing_stream", reader)
        con.execute("CREATE TABLE listing AS SELECT * FROM listing_stream")
        _current_rows(con, output, storage)
        return _decide(con, segmenter, classifier, limit)


def _current_rows(con, output: str, storage: StorageConfig | None) -> None:
    """Table ``cur``: each uri's newest row (latest ``scored_at``, then ``job_id``), index
    columns only (Parquet is columnar: the heatmaps are never read)."""
    columns = ["uri", "sha256", "source_size", "source_mtime_ns", "segmenter_name", "segmenter_version",
               "classifier_name", "classifier_version", "error", "scored_at"]
    if output and register_scores(con, output, storage, [*columns, "job_id"]):
        con.execute(f"CREATE TABLE cur AS SELECT {', '.join(columns)} FROM scores "
                    f"QUALIFY row_number() OVER ({CURRENT_ORDER}) = 1")
        return
    con.execute("CREATE TABLE cur (uri VARCHAR, sha256 VARCHAR, source_size BIGINT, source_mtime_ns BIGINT, "
                "segmenter_name VARCHAR, segmenter_version VARCHAR, classifier_name VARCHAR, "
                "classifier_version VARCHAR, error VARCHAR, scored_at TIMESTAMPTZ)")


def _decide(con, segmenter: ModelRef | None, classifier: ModelRef, limit: int | None) -> Decision:
    retried = " OR ".join(f"starts_with(c.error, '{prefix}')" for prefix in STORAGE_ERRORS)
    same_segmenter = ("c.segmenter_version IS NULL" if segmenter is None
                      else "c.segmenter_name = $seg_name AND c.segmenter_version = $seg_version")
    params = {"cls_name": classifier.name, "cls_version": str(classifier.version)}
    if segmenter is not None:
        params.update(seg_name=segmenter.name, seg_version=str(segmenter.version))
    # done: the current rows scored by these models that count as scored.
    con.execute(f"CREATE TABLE done AS SELECT c.* FROM cur c WHERE c.classifier_name = $cls_name "
                f"AND c.classifier_version = $cls_version AND {same_segmenter} AND NOT coalesce({retried}, false)",
                params)
    # A listed input is done when its current row has the same size and time; a row from
    # before version 3 (no listing columns) when the input was last modified before it was
    # scored (then the bytes scored are the bytes there now).
    con.execute("""CREATE TABLE todo AS SELECT l.* FROM listing l LEFT JOIN done d ON d.uri = l.uri
                   WHERE d.uri IS NULL
                      OR (d.source_size IS NOT NULL AND (d.source_size <> l.source_size
                          OR d.source_mtime_ns <> l.source_mtime_ns))
                      OR (d.source_size IS NULL AND (d.scored_at IS NULL
                                                   OR l.source_mtime_ns > epoch_ms(d.scored_at) * 1000000))""")
    listed = con.execute("SELECT count(*) FROM listing").fetchall()[0][0]
    unscored = con.execute("SELECT count(*) FROM todo").fetchall()[0][0]
    cut = f" LIMIT {int(limit)}" if limit else ""
    inputs = con.sql(f"SELECT * FROM todo ORDER BY uri{cut}").to_arrow_table().cast(ENTRY_SCHEMA)
    why = {}
    if inputs.num_rows:
        con.execute(f"CREATE TABLE now AS SELECT uri, source_size, source_mtime_ns FROM todo ORDER BY uri{cut}")
        counts = con.execute(f"""SELECT
                count(*) FILTER (WHERE c.uri IS NULL),
                count(*) FILTER (WHERE c.uri IS NOT NULL AND coalesce({retried}, false)),
                count(*) FILTER (WHERE c.uri IS NOT NULL AND NOT coalesce({retried}, false)
                                 AND c.source_size IS NOT NULL AND c.source_mtime_ns IS NOT NULL
                                 AND (n.source_size <> c.source_size OR n.source_mtime_ns <> c.source_mtime_ns)),
                count(*)
            FROM now n LEFT JOIN cur c ON c.uri = n.uri""").fetchall()[0]
        new, retry, changed, total = counts
        why = {k: v for k, v in (("new", new), ("retry", retry), ("changed", changed),
                                 ("backfill", total - new - retry - changed)) if v}
    legacy = con.execute("SELECT uri, sha256 FROM done WHERE source_size IS NULL").fetchall()
    return Decision(listed, unscored, inputs, why, {key(u, s) for u, s in legacy})


def _decide_in_memory(listing: pa.Table, output: str, segmenter: ModelRef | None, classifier: ModelRef,
                      storage: StorageConfig | None, limit: int | None) -> Decision:
    """``decide`` without DuckDB: the same rules, with the listing and the current rows in memory."""
    import pyarrow.compute as pc

    columns = ["uri", "sha256", "source_size", "source_mtime_ns", "segmenter_name", "segmenter_version",
               "classifier_name", "classifier_version", "error", "scored_at", "job_id"]
    cur = current_rows(read_scores(output, storage, columns)) if output else pa.table({c: [] for c in columns})

    def retried(t: pa.Table):
        return pc.fill_null(pc.or_(*[pc.starts_with(t["error"], p) for p in STORAGE_ERRORS]), False)

    def same(t: pa.Table, kind: str, ref: ModelRef):
        return pc.fill_null(pc.and_(pc.equal(t[f"{kind}_name"], ref.name),
                                    pc.equal(t[f"{kind}_version"], str(ref.version))), False)

    done = cur
    if cur.num_rows:
        seg = pc.is_null(cur["segmenter_version"]) if segmenter is None else same(cur, "segmenter", segmenter)
        done = cur.filter(pc.and_(pc.and_(pc.fill_null(seg, False), same(cur, "classifier", classifier)),
                                  pc.invert(retried(cur))))
    todo = listing
    if done.num_rows:
        joined = listing.join(done.select(["uri", "source_size", "source_mtime_ns", "scored_at"])
                              .rename_columns(["uri", "d_size", "d_mtime", "d_scored"]), keys="uri",
                              join_type="left outer")
        scored_ns = pc.multiply(pc.cast(pc.cast(joined["d_scored"], pa.timestamp("ms")), pa.int64()), 1_000_000)
        # Not done: no row of these models; or its size or time differ; or, for a row from before
        # version 3 (no listing columns), the file changed after it was scored (or when is unknown).
        legacy = pc.is_null(joined["d_size"])
        matched = pc.is_in(joined["uri"], done["uri"])
        keep = pc.or_(pc.invert(matched),
                      pc.if_else(legacy, pc.fill_null(pc.greater(joined["source_mtime_ns"], scored_ns), True),
                                 pc.fill_null(pc.or_(pc.not_equal(joined["source_size"], joined["d_size"]),
                                                     pc.not_equal(joined["source_mtime_ns"], joined["d_mtime"])),
                                              False)))
        todo = joined.filter(keep).select(ENTRY_SCHEMA.names)
    todo = todo.sort_by("uri")
    inputs = todo.slice(0, limit) if limit else todo
    why = {}
    if inputs.num_rows:
        known = cur.select(["uri", "source_size", "source_mtime_ns"]).rename_columns(["uri", "c_size", "c_mtime"])
        known = known.append_column("retry", retried(cur)) if cur.num_rows else known.append_column(
            "retry", pa.array([], pa.bool_()))
        j = inputs.select(["uri", "source_size", "source_mtime_ns"]).join(known, keys="uri", join_type="left outer")
        new = pc.is_null(j["retry"])
        retry = pc.fill_null(j["retry"], False)
        changed = pc.and_(pc.and_(pc.invert(new), pc.invert(retry)), pc.and_(
            pc.and_(pc.is_valid(j["c_size"]), pc.is_valid(j["c_mtime"])),
            pc.fill_null(pc.or_(pc.not_equal(j["source_size"], j["c_size"]),
                                pc.not_equal(j["source_mtime_ns"], j["c_mtime"])), False)))
        counts = {n: pc.sum(m).as_py() or 0 for n, m in (("new", new), ("retry", retry), ("changed", changed))}
        counts["backfill"] = j.num_rows - sum(counts.values())
        why = {k: v for k, v in counts.items() if v}
    legacy_rows = done.filter(pc.is_null(done["source_size"])) if done.num_rows else done
    skip = {key(u, s) for u, s in zip(legacy_rows["uri"].to_pylist(), legacy_rows["sha256"].to_pylist())}
    return Decision(listing.num_rows, todo.num_rows, inputs, why, skip)
