"""Measure Delta Lake (Ray Data write_delta / deltalake) against one-Parquet-part-per-task commits.

Issue 13; on local disk and a loopback moto S3 server. (a) kill -9 of a Ray Data write at ~50%:
rows readable after, files left, what a rerun (anti-join on committed ids) rescores, duplicates
and orphans after it. (b) Two processes appending to one Delta table at once, plus a commit from
a stale snapshot (safe only with put-if-absent). (c) MERGE / DELETE on a 10k-row table with a 3 KB
binary column, against appending the rows as a new part. Writes docs/results/table_format_probe.json.

Needs ``pip install deltalake``, NOT in the project's pinned dependencies: without it the probe
says so and exits 2. Usage: ``python -m experiments.table_format_probe [--no-s3]`` (about 6 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

try:
    import deltalake
    from deltalake import DeltaTable, write_deltalake
except ImportError:
    deltalake = None

BUCKET = "probe-bucket"


def delta_options(endpoint: str | None, extra: dict | None = None) -> dict | None:
    # delta-rs (object_store) keys. Since deltalake 0.23 an S3 commit is a put-if-absent
    # (If-None-Match: *) with no DynamoDB lock; moto 5 honours If-None-Match.
    if not endpoint:
        return None
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "probe", "AWS_SECRET_ACCESS_KEY": "probe", **(extra or {})}


def fs_and_root(path: str, endpoint: str | None) -> tuple[pafs.FileSystem, str]:
    if path.startswith("s3://"):
        return pafs.S3FileSystem(access_key="probe", secret_key="probe", region="us-east-1",
                                 endpoint_override=endpoint, force_virtual_addressing=False), path[5:]
    return pafs.LocalFileSystem(), path


def data_files(path: str, endpoint: str | None) -> list[str]:
    """.parquet files outside _delta_log/ and _tmp/: what a write leaves on storage."""
    fs, root = fs_and_root(path, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.path.endswith(".parquet")
            and not any(p.startswith("_") for p in i.path[len(root):].split("/"))]


class PartSink(Datasink):
    """Like cxr.scoring.AtomicParquetSink: each write task commits one file, tmp + rename(2) on
    local disk, one PUT (visible only when complete) on S3. With delta=True each write task
    instead commits its rows as its own Delta append (one log entry per task)."""

    def __init__(self, path: str, endpoint: str | None, delta: bool = False):
        self.path, self.endpoint, self.delta = path.rstrip("/"), endpoint, delta

    def write(self, blocks, ctx) -> int:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return 0
        table, (fs, root) = pa.concat_tables(tables), fs_and_root(self.path, self.endpoint)
        if self.delta:
            write_deltalake(self.path, table, mode="append", storage_options=delta_options(self.endpoint))
            return table.num_rows
        final = f"{root}/part-{uuid.uuid4().hex}.parquet"
        if self.path.startswith("s3://"):
            pq.write_table(table, final, filesystem=fs)
        else:
            fs.create_dir(f"{root}/_tmp", recursive=True)
            tmp = f"{root}/_tmp/{uuid.uuid4().hex}.parquet"
            pq.write_table(table, tmp, filesystem=fs)
            os.replace(tmp, final)
        return table.num_rows


def child_pipeline(a: argparse.Namespace) -> None:
    """Subprocess: ray.data.range -> 'scoring' (sleep per row) -> write_delta or PartSink."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    skip = np.array(json.loads(a.skip), dtype=np.int64)   # ids already committed (the anti-join)

    def score(batch):
        ids = batch["id"][~np.isin(batch["id"], skip)]
        time.sleep(len(ids) * a.sec_per_row)
        return {"id": ids, "score": ids * 0.5}

    ds = ray.data.range(a.rows, override_num_blocks=a.blocks).map_batches(score, batch_size=None)
    if a.child == "delta":   # Ray's own sink: tasks write files, the driver commits once at the end
        ds.write_delta(a.path, storage_options=delta_options(a.endpoint))
    elif a.child == "delta_task":   # create the table first, so tasks do not race to create it
        if not DeltaTable.is_deltatable(a.path, storage_options=delta_options(a.endpoint)):
            empty = pa.table({"id": pa.array([], pa.int64()), "score": pa.array([], pa.float64())})
            write_deltalake(a.path, empty, storage_options=delta_options(a.endpoint))
        ds.write_datasink(PartSink(a.path, a.endpoint, delta=True))
    else:
        ds.write_datasink(PartSink(a.path, a.endpoint))


def child_append(a: argparse.Namespace) -> None:
    """Subprocess: one of two concurrent writers; prints {"ok": n, "errors": [...]}."""
    opts, ok, errors = delta_options(a.endpoint, json.loads(a.extra)), 0, []
    while time.time() < a.start_at:   # both writers start together
        time.sleep(0.01)
    for seq in range(a.commits):
        rows = pa.table({"writer": [int(a.writer)] * 50, "seq": [seq] * 50, "i": list(range(50))})
        try:
            write_deltalake(a.path, rows, mode="append", storage_options=opts)
            ok += 1
        except Exception as e:  # noqa: BLE001 -- record whatever delta-rs raises
            errors.append(f"{type(e).__name__}: {str(e)[:160]}")
    print(json.dumps({"ok": ok, "errors": errors}))


def read_rows(sink: str, path: str, endpoint: str | None) -> tuple[pa.Table | None, str | None]:
    try:
        if sink != "parts":
            return DeltaTable(path, storage_options=delta_options(endpoint)).to_pyarrow_table(), None
        fs, root = fs_and_root(path, endpoint)   # pyarrow datasets skip "_"-prefixed paths
        return pads.dataset(root, filesystem=fs, format="parquet").to_table(), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def child(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.table_format_probe", "--child", *args], **kw)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group and every descendant (Ray's raylet, workers)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def probe_kill(sink: str, path: str, ep: str | None, a, log) -> dict:
    args = [sink, "--path", path, "--rows", str(a.rows), "--blocks", str(a.blocks),
            "--sec-per-row", str(a.sec_per_row)] + (["--endpoint", ep] if ep else [])
    t0 = time.time()
    proc = child([*args, "--skip", "[]"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and len(data_files(path, ep)) < a.blocks // 2:   # ~50% of tasks written
        time.sleep(0.2)
    out = {"finished_before_kill": proc.poll() is not None, "data_files_at_kill": len(data_files(path, ep))}
    kill9(proc)
    out["killed_after_s"] = round(time.time() - t0, 1)
    table, out["read_error_after_kill"] = read_rows(sink, path, ep)
    out["rows_readable_after_kill"] = table.num_rows if table else 0
    out["data_files_on_storage_after_kill"] = len(data_files(path, ep))
    committed = table.column("id").to_pylist() if table else []
    t0 = time.time()   # rerun to completion, scoring only ids that are not committed
    out["rerun_rc"] = child([*args, "--skip", json.dumps(committed)], stdout=log, stderr=subprocess.STDOUT).wait()
    table, out["read_error_after_rerun"] = read_rows(sink, path, ep)
    ids = table.column("id").to_pylist() if table else []
    stored = len(data_files(path, ep))
    referenced = stored if sink == "parts" else len(DeltaTable(path, storage_options=delta_options(ep)).file_uris())
    out.update(rerun_s=round(time.time() - t0, 1), rows_rescored_by_rerun=a.rows - len(committed),
               rows_after_rerun=len(ids), distinct_ids_after_rerun=len(set(ids)),
               data_files_on_storage_after_rerun=stored, orphan_files_after_rerun=stored - referenced)
    return out


def probe_concurrent(path: str, ep: str | None, extra: dict, a, log) -> dict:
    opts = delta_options(ep, extra)
    write_deltalake(path, pa.table({"writer": [-1], "seq": [-1], "i": [-1]}), storage_options=opts)  # seed
    args = ["append", "--path", path, "--commits", str(a.commits), "--extra", json.dumps(extra),
            "--start-at", str(time.time() + 4)] + (["--endpoint", ep] if ep else [])   # 4 s: imports
    procs = [child([*args, "--writer", str(w)], stdout=subprocess.PIPE, stderr=log, text=True) for w in (0, 1)]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    dt = DeltaTable(path, storage_options=opts)
    keys = [(r["writer"], r["seq"], r["i"]) for r in dt.to_pyarrow_table().to_pylist() if r["writer"] >= 0]
    reported = sum(r["ok"] for r in results) * 50
    out = {"storage_options_extra": extra, "commits_attempted": 2 * a.commits, "commits_reported_ok":
           [r["ok"] for r in results], "error_count": sum(len(r["errors"]) for r in results),
           "errors": sum((r["errors"] for r in results), [])[:4], "table_version": dt.version(),
           "rows_reported_written": reported, "rows_in_table": len(keys),
           "duplicate_rows": len(keys) - len(set(keys)), "rows_lost": reported - len(set(keys))}
    # Deterministic race: commit from a snapshot another writer has already advanced. Safe only
    # if the log entry is written put-if-absent; otherwise version N+1 is overwritten and lost.
    stale = DeltaTable(path, storage_options=opts)
    write_deltalake(path, pa.table({"writer": [7], "seq": [0], "i": [0]}), mode="append", storage_options=opts)
    write_deltalake(stale, pa.table({"writer": [8], "seq": [0], "i": [0]}), mode="append")
    kept = set(DeltaTable(path, storage_options=opts).to_pyarrow_table().column("writer").to_pylist())
    out["stale_snapshot_commit_both_kept"] = {7, 8} <= kept
    return out


def probe_merge(path: str, ep: str | None, a) -> dict:
    opts, rng, timed = delta_options(ep), np.random.default_rng(0), {}

    def rows(ids, version):   # random bytes: incompressible, like PNG heatmaps
        return pa.table({"uri": [f"s3://inputs/img{i:06d}.dcm" for i in ids],
                         "score": [float(version)] * len(ids), "heatmap_png": [rng.bytes(3072) for _ in ids]})
    t0 = time.time()
    for chunk in np.array_split(np.arange(a.merge_rows), 10):   # 10 nightly-sized appends
        write_deltalake(path, rows(chunk, 0), mode="append", storage_options=opts)
    timed["build_10_appends_s"] = round(time.time() - t0, 2)
    changed = rng.choice(a.merge_rows, a.merge_rows // 100, replace=False)
    source, t0 = rows(changed, 1), time.time()
    m = (DeltaTable(path, storage_options=opts).merge(source, predicate="t.uri = s.uri", source_alias="s",
         target_alias="t").when_matched_update_all().when_not_matched_insert_all().execute())
    timed["merge_s"] = round(time.time() - t0, 2)
    after = DeltaTable(path, storage_options=opts).to_pyarrow_table()
    gone, t0 = ", ".join(f"'s3://inputs/img{i:06d}.dcm'" for i in changed[:50]), time.time()
    d = DeltaTable(path, storage_options=opts).delete(f"uri IN ({gone})")
    timed["delete_50_s"] = round(time.time() - t0, 2)
    fs, root = fs_and_root(path + "_parts", ep)   # the parts way: append the new rows as one more part
    fs.create_dir(root, recursive=True)
    t0 = time.time()
    pq.write_table(source, f"{root}/part-{uuid.uuid4().hex}.parquet", filesystem=fs)
    timed["append_part_s"] = round(time.time() - t0, 3)
    return {"rows": a.merge_rows, "rows_merged": len(changed), **timed, "rows_after_merge": after.num_rows,
            "rows_with_new_score": int(np.sum(after.column("score").to_numpy() == 1.0)),
            "merge_files_removed": m.get("num_target_files_removed"),
            "merge_files_added": m.get("num_target_files_added"),
            "merge_rows_copied": m.get("num_target_rows_copied"), "delete_rows_copied": d.get("num_copied_rows")}


def start_moto(log) -> tuple[subprocess.Popen, str]:
    import boto3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for attempt in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:  # noqa: BLE001 -- not listening yet
            if attempt == 99:
                proc.kill()
                raise
            time.sleep(0.2)


def show(title: str, section: dict, **cols: str) -> None:
    print(f"\n{title:<18}" + "".join(f"{c:>10}" for c in cols))
    for name, v in section.items():
        print(f"{name:<18}" + "".join(f"{str(v[k]):>10}" for k in cols.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000, help="rows in the kill -9 pipeline")
    p.add_argument("--blocks", type=int, default=20, help="Ray blocks = write tasks = data files")
    p.add_argument("--sec-per-row", type=float, default=0.02, help="simulated scoring time per row")
    p.add_argument("--commits", type=int, default=20, help="appends per concurrent writer")
    p.add_argument("--merge-rows", type=int, default=10_000, help="rows in the MERGE table")
    p.add_argument("--no-s3", action="store_true", help="local disk only (no moto server)")
    p.add_argument("--out", default="docs/results/table_format_probe.json")
    for hidden in ("--child", "--path", "--endpoint", "--skip", "--extra", "--writer", "--start-at"):
        p.add_argument(hidden, help=argparse.SUPPRESS, type=float if hidden == "--start-at" else str)
    a = p.parse_args(argv)
    if deltalake is None:
        print("deltalake is not installed: pip install deltalake (not a pinned dependency)", file=sys.stderr)
        return 2
    if a.child:
        return (child_append if a.child == "append" else child_pipeline)(a) or 0
    os.environ.update(AWS_ACCESS_KEY_ID="probe", AWS_SECRET_ACCESS_KEY="probe", AWS_DEFAULT_REGION="us-east-1")
    work = tempfile.TemporaryDirectory(prefix="table_format_probe_")
    log = open("/tmp/table_format_probe.log", "w")   # the children's output, for debugging
    moto, endpoint = (None, None) if a.no_s3 else start_moto(log)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": "dev: 2 cores, no GPU",
           "deltalake": deltalake.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
           "command": " ".join(["python -m experiments.table_format_probe", *(sys.argv[1:] if argv is None else argv)]),
           "params": {k: getattr(a, k) for k in ("rows", "blocks", "sec_per_row", "commits", "merge_rows")},
           "kill9": {}, "concurrent_append": {}, "merge": {}}
    targets = {"local": (os.path.join(work.name, "local"), None)}
    if endpoint:
        targets["s3"] = (f"s3://{BUCKET}/probe", endpoint)
    try:
        for where, (root, ep) in targets.items():
            for sink in ("delta", "delta_task", "parts"):
                res["kill9"][f"{where}/{sink}"] = r = probe_kill(sink, f"{root}/kill_{sink}", ep, a, log)
                print(where, sink, r, flush=True)
            variants = {"default": {}} | ({"unsafe_rename": {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}} if ep else {})
            for name, extra in variants.items():
                r = res["concurrent_append"][f"{where}/{name}"] = probe_concurrent(f"{root}/c_{name}", ep, extra, a, log)
                print(where, name, r, flush=True)
            res["merge"][where] = r = probe_merge(f"{root}/merge", ep, a)
            print(where, "merge", r, flush=True)
    finally:
        if moto:
            moto.kill()
        log.close()
        work.cleanup()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    show("kill -9 at ~50%", res["kill9"], readable="rows_readable_after_kill", left="data_files_on_storage_after_kill",
         rescored="rows_rescored_by_rerun", after="rows_after_rerun", distinct="distinct_ids_after_rerun",
         orphans="orphan_files_after_rerun")
    show("2 writers", res["concurrent_append"], ok="commits_reported_ok", errors="error_count", rows="rows_in_table",
         dups="duplicate_rows", lost="rows_lost", stale_ok="stale_snapshot_commit_both_kept")
    show("merge 1%", res["merge"], merge_s="merge_s", files_out="merge_files_removed", files_in="merge_files_added",
         copied="merge_rows_copied", delete_s="delete_50_s", part_s="append_part_s")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
