"""The scores table without models: current rows, compaction (and a compaction killed half way),
the output's lease on local disk and on the loopback S3 server, S3 listings and inventories."""

import datetime as dt
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cxr.lease import Lease, LeaseHeld
from cxr.scores_table import (COMPACTION_DIR, SCHEMA, compact, current_rows, finish_compactions, live_files,
                              read_current, read_scores, to_schema, write_part)

T0 = dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)


def _rows(uris: list[str], job: str, minutes: int, status: str = "ok") -> pa.Table:
    rows = {f.name: [None] * len(uris) for f in SCHEMA}
    rows.update(uri=uris, status=[status] * len(uris), job_id=[job] * len(uris), qc_flags=[[]] * len(uris),
                scored_at=[T0 + dt.timedelta(minutes=minutes)] * len(uris), heatmap_png=[b"x" * 100] * len(uris))
    return to_schema(pa.Table.from_pydict(rows, schema=SCHEMA))


def _table(root, parts: list[pa.Table], date: str = "2026-11-27") -> str:
    fs = pafs.LocalFileSystem()
    for i, part in enumerate(parts):
        write_part(fs, str(root), f"scored_date={date}/part-{i:04d}.parquet", part)
    return str(root)


def test_the_current_row_of_an_input_is_its_newest(tmp_path):
    out = _table(tmp_path, [_rows(["a", "b"], "job1", 0), _rows(["a"], "job2", 5, "error"), _rows(["c"], "job2", 5)])
    assert len(read_scores(out)) == 4                                  # history is kept
    current = read_current(out, columns=["uri", "job_id", "status"]).to_pydict()
    assert sorted(zip(current["uri"], current["job_id"], current["status"])) == [
        ("a", "job2", "error"), ("b", "job1", "ok"), ("c", "job2", "ok")]
    assert current_rows(SCHEMA.empty_table()).num_rows == 0
    assert read_current(str(tmp_path / "no-table")).num_rows == 0      # every column, partition too


def test_compaction_merges_small_parts_and_keeps_every_row(tmp_path):
    parts = [_rows([f"u{i:03d}-{j}" for j in range(3)], f"job{i % 2}", i) for i in range(40)]
    out = _table(tmp_path / "scores", parts)
    before = read_scores(out).sort_by("uri")
    result = compact(out, target_rows=50)
    assert result["before"] == 40 and result["after"] == 3            # 120 rows in parts of <= 50
    after = read_scores(out).sort_by("uri")
    assert after.equals(before)
    assert compact(out, target_rows=50)["merged"] == 0                # nothing left to merge


def test_a_compaction_killed_half_way_never_shows_a_row_twice(tmp_path):
    """Killed after the merged part landed but before its sources were deleted: readers skip
    the sources; the next compaction (or score job) deletes them."""
    out = _table(tmp_path / "scores", [_rows([f"u{i}"], "job", i) for i in range(6)])
    fs, root, files = live_files(out)
    sources = [os.path.relpath(f, root) for f in files[:4]]
    merged = pa.concat_tables(pq.read_table(f) for f in files[:4])
    os.makedirs(f"{root}/{COMPACTION_DIR}")
    with open(f"{root}/{COMPACTION_DIR}/x.json", "w") as f:
        json.dump({"sources": sources, "target": "scored_date=2026-11-27/part-compacted-x.parquet"}, f)
    assert len(read_scores(out)) == 6                                 # record written, merged part not yet
    write_part(fs, root, "scored_date=2026-11-27/part-compacted-x.parquet", merged)
    assert len(read_scores(out)) == 6                                 # both there: the sources are skipped
    assert finish_compactions(out) == 1
    assert len(live_files(out)[2]) == 3 and len(read_scores(out)) == 6
    assert not os.listdir(f"{root}/{COMPACTION_DIR}")


def test_a_second_writer_cannot_take_a_held_lease(tmp_path):
    out = str(tmp_path / "scores")
    with Lease(out, "job-a", ttl_s=60) as first:
        with pytest.raises(LeaseHeld, match="being written by job job-a"):
            Lease(out, "job-b", ttl_s=60).acquire()
        assert first.generation == 0
    with Lease(out, "job-b", ttl_s=60) as second:                     # released: the next takes over
        assert second.generation == 1
    assert sorted(os.listdir(tmp_path / "scores" / "_lease")) == ["000000000001.json"]


def test_a_lease_of_a_killed_process_is_taken_at_once(tmp_path):
    """A holder killed with -9 leaves its lease; on the same host its pid is gone, so the next
    job does not wait out the ttl."""
    out = str(tmp_path / "scores")
    code = (f"from cxr.lease import Lease; import os; l = Lease({out!r}, 'killed', ttl_s=3600); l.acquire(); "
            "os._exit(0)")                                             # exits without releasing
    subprocess.run([sys.executable, "-c", code], check=True)
    holder = Lease(out, "x").holder()
    assert holder[1]["job_id"] == "killed" and Lease.stale(holder[1])
    with Lease(out, "next", ttl_s=60) as lease:
        assert lease.generation == 1


def test_a_lease_without_heartbeat_expires(tmp_path):
    record = {"job_id": "j", "host": "another-host", "pid": 1, "heartbeat": 1000.0, "ttl_s": 60}
    assert Lease.stale(record, now=1061.0) and not Lease.stale(record, now=1059.0)


def test_the_lease_on_s3_uses_a_conditional_put(local_stack, storage):
    local_stack.create_bucket("cxr-lease")
    out = "s3://cxr-lease/scores"
    with Lease(out, "job-a", storage, ttl_s=60):
        with pytest.raises(LeaseHeld, match="job-a"):
            Lease(out, "job-b", storage, ttl_s=60).acquire()
        # Two racers for the same generation: the store lets exactly one create it.
        racers = [Lease(out, f"r{i}", storage, ttl_s=60) for i in range(2)]
        assert [r._create(7) for r in racers] == [True, False]
    with pytest.raises(LeaseHeld, match="job r0"):                    # the winner holds it
        Lease(out, "job-c", storage, ttl_s=60).acquire()
    racers[0].generation = 7
    racers[0].release()
    with Lease(out, "job-c", storage, ttl_s=60) as lease:
        assert lease.generation == 8


def test_a_lease_that_cannot_be_released_never_hides_how_the_job_ended(local_stack, tmp_path):
    """The store fails as the job ends: release logs and leaves the lease to expire."""
    from cxr.data.storage import StorageConfig
    from tests.flaky_proxy import FlakyProxy

    local_stack.create_bucket("cxr-lease")
    down: set[str] = set()
    with FlakyProxy(local_stack.s3_endpoint, fail_every=10**9, down=down) as proxy:
        storage = StorageConfig(s3_endpoint=proxy.endpoint, max_attempts=2)
        lease = Lease("s3://cxr-lease/released", "job", storage, ttl_s=60)
        lease.acquire()                                                 # a conditional PUT through the proxy
        down.add(f"cxr-lease/released/_lease/{lease.generation:012d}.json")
        generation = lease.generation
        lease.release()                                                 # 503s: no exception
    key = f"released/_lease/{generation:012d}.json"
    record = json.loads(local_stack.s3_client().get_object(Bucket="cxr-lease", Key=key)["Body"].read())
    assert "released" not in record and record["job_id"] == "job"      # left to expire


def test_s3_listing_inventory_and_head_agree_on_identity(local_stack, storage, sample_root, tmp_path):
    """An input listed page by page, named in a manifest (HEAD) or in an S3 Inventory report has
    the same (uri, size, mtime): switching how the archive is listed never rescores it."""
    from cxr.data.storage import inventory_entries, list_entries, stat_entries

    local_stack.create_bucket("cxr-listing")
    s3 = local_stack.s3_client()
    images = sorted((sample_root / "covid").rglob("*.jpg"))[:5]
    for p in images:
        s3.put_object(Bucket="cxr-listing", Key=f"arch/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="cxr-listing", Key="arch/sub/", Body=b"")              # a folder marker
    s3.put_object(Bucket="cxr-listing", Key="arch2/other.jpg", Body=b"x")       # beside the prefix, not under it
    listed = list_entries("s3://cxr-listing/arch", storage, page_rows=2)
    assert listed.num_rows == 5 and all(e for e in listed["source_etag"].to_pylist())
    headed = stat_entries(listed["uri"].to_pylist(), storage)
    assert headed.select(["uri", "source_size", "source_mtime_ns"]).equals(
        listed.select(["uri", "source_size", "source_mtime_ns"]))
    objects = s3.list_objects_v2(Bucket="cxr-listing", Prefix="arch/")["Contents"]
    inventory = pa.table({"bucket": ["cxr-listing"] * (len(objects) + 1),
                          "key": [o["Key"] for o in objects] + ["arch/deleted.jpg"],
                          "size": [o["Size"] for o in objects] + [1],
                          "last_modified_date": [o["LastModified"] for o in objects] + [T0],
                          "e_tag": [o["ETag"].strip('"') for o in objects] + ["x"],
                          "is_delete_marker": [False] * len(objects) + [True]})
    pq.write_table(inventory, tmp_path / "inventory.parquet")
    from_inventory = inventory_entries(str(tmp_path / "inventory.parquet")).sort_by("uri")
    assert from_inventory.select(["uri", "source_size", "source_mtime_ns", "source_etag"]).equals(
        listed.select(["uri", "source_size", "source_mtime_ns", "source_etag"]))


def test_a_missing_bucket_is_an_error_not_an_empty_listing(local_stack, storage):
    from cxr.data.storage import list_entries

    with pytest.raises(FileNotFoundError, match="bucket"):
        list_entries("s3://no-such-bucket-here/x", storage)


def test_a_job_told_to_wait_takes_the_lease_when_it_is_released(tmp_path):
    import threading

    out = str(tmp_path / "scores")
    first = Lease(out, "first", ttl_s=60)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    second = Lease(out, "second", ttl_s=60)
    with pytest.raises(LeaseHeld):
        second.acquire(wait_s=0.3)
    second.acquire(wait_s=20)
    assert second.generation == 1
    second.release()


def test_an_unreadable_lease_file_counts_as_held_until_its_ttl(tmp_path):
    """A lease file caught half written, or damaged: never read as free while it is fresh."""
    out = tmp_path / "scores"
    (out / "_lease").mkdir(parents=True)
    for content in (b"", b"[1, 2]", b'{"job_id": "j", "heartbeat": "soon"}'):
        (out / "_lease" / "000000000003.json").write_bytes(content)
        with pytest.raises(LeaseHeld, match="unknown"):
            Lease(str(out), "next", ttl_s=60).acquire()
    old = 1_000_000_000
    os.utime(out / "_lease" / "000000000003.json", (old, old))        # written long ago: stale
    with Lease(str(out), "next", ttl_s=60) as lease:
        assert lease.generation == 4


def _race(out: str, start: float, results) -> None:
    import time

    while time.time() < start:
        pass
    lease = Lease(out, f"job-{os.getpid()}", ttl_s=60)
    try:
        lease.acquire()
        results.put("won")
        time.sleep(0.3)
    except LeaseHeld:
        results.put("held")


def test_of_racing_processes_exactly_one_takes_the_lease(tmp_path):
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        out, results = str(tmp_path / f"scores-{round_}"), ctx.Queue()
        start = time.time() + 0.2
        racers = [ctx.Process(target=_race, args=(out, start, results)) for _ in range(4)]
        for p in racers:
            p.start()
        outcomes = sorted(results.get(timeout=30) for _ in racers)
        for p in racers:
            p.join()
        assert outcomes == ["held", "held", "held", "won"], (round_, outcomes)


def test_an_unreadable_compaction_record_is_dropped_not_fatal(tmp_path):
    """Records are written whole before their merged part: one that cannot be read never had one."""
    out = _table(tmp_path / "scores", [_rows([f"u{i}"], "job", i) for i in range(3)])
    (tmp_path / "scores" / COMPACTION_DIR).mkdir()
    (tmp_path / "scores" / COMPACTION_DIR / "broken.json").write_bytes(b"")
    assert len(read_scores(out)) == 3
    assert compact(out, target_rows=10)["after"] == 1 and len(read_scores(out)) == 3
    assert not os.listdir(tmp_path / "scores" / COMPACTION_DIR)


def test_compact_names_a_missing_table_and_exits_1(tmp_path, capsys):
    from cxr.config import CompactConfig
    from jobs import compact as compact_job

    assert compact_job.main(CompactConfig(output=str(tmp_path / "typo"))) == 1
    assert "no scores table at" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_an_inventory_csv_has_url_encoded_keys(tmp_path):
    from cxr.data.storage import inventory_entries

    (tmp_path / "inventory.csv").write_text(
        "bucket,key,size,last_modified_date,e_tag\n"
        "b,arch/with%20space%2Bplus%C3%A9.jpg,10,2026-11-27T10:14:36.000Z,abc\n")
    assert inventory_entries(str(tmp_path / "inventory.csv"))["uri"].to_pylist() == ["s3://b/arch/with space+plusé.jpg"]
