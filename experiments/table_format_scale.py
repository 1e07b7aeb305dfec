"""The scores table as Parquet parts read through the documented path (docs/SCORES.md) against
Delta Lake, at 1 and 10 million rows: write time, and the time and peak memory of an outside
reader's "every input's current row".

    pip install deltalake==1.6.6        # not a cxr dependency: only to rerun this
    python -m experiments.table_format_scale --rows 1000000 10000000 --out docs/results/table_format_scale.json

Rows are the scores schema with its narrow columns filled (uri, status, labels and
probabilities, lineage, times) and no heatmaps, written in parts of ``--part-rows`` (a night's
parts are small), 1% of the uris written twice (a rescored input: the newest is current). Delta
gets one append commit per part, as a per-task Delta sink would make (the only Delta layout that
keeps a killed job's finished work: ``table_format_notes.md``). Each read runs in a fresh
process (peak memory by VmHWM): DuckDB and Polars over ``scored_date=*/*.parquet`` with the
window; DuckDB over the Delta table's Arrow dataset (delta-rs resolves the log) with the same
window. The kill -9 guarantees are tested, not timed here: tests/test_outside_readers.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxr.scores_table import SCHEMA

WINDOW = ("QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, job_id DESC) = 1")


def part(start: int, k: int, rescored: bool) -> pa.Table:
    """Rows ``start`` .. ``start + k`` (or, ``rescored``, the same uris a day later)."""
    rng = np.random.default_rng(start + rescored)
    probs = rng.dirichlet(np.ones(4), k).astype(np.float32)
    when = datetime(2026, 11, 27, tzinfo=timezone.utc) + timedelta(days=int(rescored))
    columns = {f.name: pa.nulls(k, f.type) for f in SCHEMA}
    columns.update(
        uri=pa.array([f"s3://archive/{i:09d}.dcm" for i in range(start, start + k)]),
        sha256=pa.array([f"{i:064x}" for i in range(start, start + k)]),
        status=pa.array(["ok"] * k), labels=pa.array([["covid", "normal", "bacterial", "viral"]] * k),
        probabilities=pa.array(list(probs)), covid_probability=pa.array(probs[:, 0]),
        predicted_label=pa.array(["normal"] * k), screen_positive=pa.array(probs[:, 0] > 0.6),
        classifier_name=pa.array(["c"] * k), classifier_version=pa.array(["2"] * k),
        segmenter_name=pa.array(["s"] * k), segmenter_version=pa.array(["1"] * k),
        job_id=pa.array([f"job-{start}-{int(rescored)}"] * k),
        scored_at=pa.array([when] * k, pa.timestamp("ms", "UTC")),
        source_size=pa.array(range(start, start + k), pa.int64()))
    table = pa.table(columns, schema=SCHEMA)
    return table.append_column("scored_date", pa.array([when.date().isoformat()] * k))


def parts(n: int, part_rows: int):
    for start in range(0, n, part_rows):
        yield part(start, min(part_rows, n - start), False)
    # 1% rescored a day later: their newest row is the current one.
    for start in range(0, n // 100, part_rows):
        yield part(start, min(part_rows, n // 100 - start), True)


def write_parquet(n: int, root: Path, part_rows: int) -> float:
    started = time.perf_counter()
    for i, table in enumerate(parts(n, part_rows)):
        date = table["scored_date"][0].as_py()
        folder = root / f"scored_date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.drop_columns(["scored_date"]), folder / f"part-{i:06d}.parquet")
    return time.perf_counter() - started


def write_delta(n: int, root: Path, part_rows: int) -> float:
    from deltalake import write_deltalake

    started = time.perf_counter()
    for table in parts(n, part_rows):
        write_deltalake(str(root), table, mode="append", partition_by=["scored_date"])
    return time.perf_counter() - started


READERS = {
    "duckdb_parquet": """
import duckdb
con = duckdb.connect(); con.execute("SET threads TO 2")
rows, positive = con.execute(f"SELECT count(*), sum(screen_positive::INT) FROM (SELECT uri, screen_positive FROM "
    f"read_parquet('{root}/scored_date=*/*.parquet', hive_partitioning = true, union_by_name = true) {window})").fetchone()
""",
    "polars_parquet": """
import polars as pl
frame = (pl.scan_parquet(f"{root}/scored_date=*/*.parquet", hive_partitioning=True)
         .sort(["scored_at", "job_id"], descending=True).group_by("uri").first()
         .select(pl.len().alias("rows"), pl.col("screen_positive").cast(pl.Int64).sum().alias("positive")).collect())
rows, positive = frame["rows"][0], frame["positive"][0]
""",
    "duckdb_delta": """
import duckdb
from deltalake import DeltaTable
dataset = DeltaTable(str(root)).to_pyarrow_dataset()
con = duckdb.connect(); con.execute("SET threads TO 2"); con.register("scores", dataset)
rows, positive = con.execute(f"SELECT count(*), sum(screen_positive::INT) FROM (SELECT uri, screen_positive FROM "
    f"scores {window})").fetchone()
""",
}


def read(reader: str, root: Path) -> dict:
    code = ("import json, time\nfrom pathlib import Path\n"
            f"root, window = {str(root)!r}, {WINDOW!r}\nstarted = time.perf_counter()\n" + READERS[reader]
            + "\nseconds = time.perf_counter() - started\n"
            "peak = [int(l.split()[1]) / 2**20 for l in Path('/proc/self/status').read_text().splitlines() "
            "if l.startswith('VmHWM:')][0]\n"
            "print(json.dumps({'rows': int(rows), 'positive': int(positive), 'seconds': seconds, "
            "'peak_rss_gib': peak}))")
    reply = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if reply.returncode:
        return {"error": reply.stderr.strip().splitlines()[-1]}
    return json.loads(reply.stdout.strip().splitlines()[-1])


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--part-rows", type=int, default=20_000)
    p.add_argument("--work", default="out/table-format-scale")
    p.add_argument("--out", default="out/table_format_scale.json")
    args = p.parse_args(argv)
    import deltalake

    results = []
    for n in args.rows:
        work = Path(args.work)
        shutil.rmtree(work, ignore_errors=True)
        result = {"rows_written": n + n // 100, "inputs": n, "part_rows": args.part_rows}
        result["parquet_write_s"] = write_parquet(n, work / "parquet", args.part_rows)
        result["delta_write_s"] = write_delta(n, work / "delta", args.part_rows)
        result["parquet_bytes"] = folder_bytes(work / "parquet")
        result["delta_bytes"] = folder_bytes(work / "delta")
        for reader in READERS:
            result[reader] = read(reader, work / ("delta" if "delta" in reader else "parquet"))
            assert result[reader].get("rows") == n, (reader, result[reader])
        print(json.dumps(result), flush=True)
        results.append(result)
    shutil.rmtree(args.work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": "dev: 2 cores, 24 GiB, no GPU", "deltalake": deltalake.__version__,
                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
