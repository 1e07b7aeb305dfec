"""The scores table read by the engines analysts use, DuckDB and Polars, through the reading
path docs/SCORES.md gives: after a score job or a compaction killed at any point, exactly one
current row per input, the same rows cxr's own reader gives."""

import json
import os

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr.scores_table import (COMPACTION_DIR, SCHEMA, TMP_DIR, compact, current_batches, finish_compactions,
                              live_files, read_current, to_schema, write_part)

# The documented reading path (docs/SCORES.md, "Reading it from other engines"): committed
# parts only (the scored_date folders; never _tmp/), each input's newest row.
DUCKDB_CURRENT = """SELECT uri, scored_at, job_id, status FROM read_parquet('{out}/scored_date=*/*.parquet',
    hive_partitioning = true, union_by_name = true)
QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, job_id DESC) = 1"""


def polars_current(out: str) -> pl.DataFrame:
    return (pl.scan_parquet(f"{out}/scored_date=*/*.parquet", hive_partitioning=True)
            .select("uri", "scored_at", "job_id", "status")
            .sort(["uri", "scored_at", "job_id"], descending=[False, True, True])
            .unique(subset="uri", keep="first").collect())


def _part(out: str, date: str, name: str, uris: list[str], job: str, second: int) -> None:
    import datetime as dt

    rows = {f.name: [None] * len(uris) for f in SCHEMA}
    rows.update(uri=uris, status=["ok"] * len(uris), job_id=[job] * len(uris), qc_flags=[[]] * len(uris),
                scored_at=[dt.datetime(2026, 11, 27, 0, 0, second, tzinfo=dt.timezone.utc)] * len(uris))
    os.makedirs(f"{out}/scored_date={date}", exist_ok=True)
    pq.write_table(to_schema(pa.Table.from_pydict(rows, schema=SCHEMA)), f"{out}/scored_date={date}/{name}")


def _current(out: str) -> dict[str, tuple]:
    """uri -> (job_id, status) from each reader; all three must agree, one row per uri."""
    ours = read_current(out, columns=["uri", "job_id", "status"]).to_pylist()
    batched = [r for b in current_batches(out, columns=["uri", "job_id", "status"]) for r in b.to_pylist()]
    duck = duckdb.sql(DUCKDB_CURRENT.format(out=out)).fetchall()
    polar = polars_current(out).rows()
    answers = [{r["uri"]: (r["job_id"], r["status"]) for r in ours},
               {r["uri"]: (r["job_id"], r["status"]) for r in batched},
               {u: (j, s) for u, _, j, s in duck}, {u: (j, s) for u, _, j, s in polar}]
    assert [len(ours), len(batched), len(duck), len(polar)] == [len(answers[0])] * 4, "a uri read twice"
    assert all(a == answers[0] for a in answers), answers
    return answers[0]


@pytest.fixture()
def table(tmp_path) -> str:
    """Small parts of two nights; u0..u3 rescored on the second night (their first rows are history)."""
    out = str(tmp_path / "scores")
    for i in range(4):
        _part(out, "2026-11-27", f"part-a{i}.parquet", [f"u{2 * i}", f"u{2 * i + 1}"], "night-1", 1)
    _part(out, "2026-11-28", "part-b0.parquet", ["u0", "u1", "u2", "u3"], "night-2", 5)
    return out


def test_every_engine_reads_one_current_row_per_input_through_a_killed_compaction(table):
    expected = _current(table)
    assert expected["u0"] == ("night-2", "ok") and expected["u7"] == ("night-1", "ok") and len(expected) == 8
    fs, root, files = live_files(table)
    night = sorted(os.path.relpath(f, root) for f in files if "2026-11-27" in f)
    merged = pa.concat_tables(pq.read_table(f"{root}/{s}") for s in night)
    target = "scored_date=2026-11-27/part-compacted-x.parquet"
    os.makedirs(f"{root}/{COMPACTION_DIR}")
    with open(f"{root}/{COMPACTION_DIR}/x.json", "w") as f:                  # killed: record written
        json.dump({"sources": night, "target": target}, f)
    assert _current(table) == expected
    write_part(fs, root, target, merged)                                       # killed: merged part landed
    assert _current(table) == expected
    os.remove(f"{root}/{night[0]}")                                            # killed: one source deleted
    assert _current(table) == expected
    assert finish_compactions(table) == 1 and _current(table) == expected     # the next run finishes it
    compact(table, target_rows=100)                                            # and a whole compaction
    assert _current(table) == expected


def test_a_killed_score_jobs_unfinished_part_is_never_read(table):
    expected = _current(table)
    os.makedirs(f"{table}/{TMP_DIR}")
    with open(f"{table}/{TMP_DIR}/part-killed.parquet", "wb") as f:          # a writer killed mid-part
        f.write(b"PAR1 half a part")
    _part(table, "2026-11-28", "../_tmp/part-whole-but-uncommitted.parquet", ["u9"], "killed", 9)
    assert _current(table) == expected
