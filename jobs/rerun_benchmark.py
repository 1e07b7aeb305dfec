"""What a nightly rerun costs (issue 13): the figures of docs/RESULTS.md's "Reruns" section.

Two modes:

- ``--images N``: ``cxr score`` on N real images (local files, repeated as distinct links where
  the folder has fewer), then the same listing again with nothing new, then with 1% new files,
  and those new files alone into a fresh output. Wall time of each, and whether the
  nothing-new rerun started Ray.
- ``--synthetic M``: deciding what is new at M inputs with no model at all. An output holding M
  committed rows (synthetic listing columns, no heatmaps) is written in parts, then the scoring
  driver's own steps run on it: its current rows (``scored_index``), those of these models
  (``committed``), the anti-join of a listing of M + 1% entries (``new_work``) and why each is
  new (``why_new``). Reports the time and the peak memory of that process.

    python -m jobs.rerun_benchmark --images 2000 --input data/sample --out out/rerun
    python -m jobs.rerun_benchmark --synthetic 1000000 --out out/rerun
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxr.config import ScoreConfig
from cxr.data.storage import ENTRY_SCHEMA, list_files
from cxr.scoring import SCHEMA, ModelRef, committed, new_work, scored_index, why_new

# cxr.workflows.benchmark (and torch with it) is imported where used: the decision's memory is
# measured in a process that imports only what the scoring driver does.


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux


def synthetic(n: int, out: Path) -> dict:
    """Deciding what is new at ``n`` committed inputs plus 1% new ones."""
    root = out / "synthetic-scores" / "scored_date=2026-11-27"
    shutil.rmtree(out / "synthetic-scores", ignore_errors=True)
    root.mkdir(parents=True)
    part_rows = 100_000
    for start in range(0, n, part_rows):
        k = min(part_rows, n - start)
        columns = {f.name: pa.nulls(k, f.type) for f in SCHEMA}
        columns.update(uri=pa.array([f"s3://archive/{i:09d}.dcm" for i in range(start, start + k)]),
                       source_size=pa.array(range(start, start + k), pa.int64()),
                       source_mtime_ns=pa.array([1_700_000_000_000_000_000] * k, pa.int64()),
                       segmenter_name=pa.array(["s"] * k), segmenter_version=pa.array(["1"] * k),
                       classifier_name=pa.array(["c"] * k), classifier_version=pa.array(["2"] * k),
                       status=pa.array(["ok"] * k), job_id=pa.array([f"job-{start}"] * k),
                       scored_at=pa.array([datetime(2026, 11, 27, tzinfo=timezone.utc)] * k, pa.timestamp("ms", "UTC")))
        pq.write_table(pa.table(columns, schema=SCHEMA), root / f"part-{start:09d}.parquet")
    # The decision runs in a fresh process, as a nightly driver would: its peak memory is the
    # listing's and the join's, not the writing of the synthetic output above.
    import subprocess

    code = f"from jobs.rerun_benchmark import decide; decide({n}, {str(out)!r})"
    reply = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(reply.stdout.strip().splitlines()[-1])


def decide(n: int, out: str) -> None:
    """Build a listing of n + 1% entries (as ``list_entries`` would) and anti-join it against the
    committed rows; print the figures as one JSON line."""
    extra = n // 100
    started = time.perf_counter()
    listing = pa.table({"uri": [f"s3://archive/{i:09d}.dcm" for i in range(n + extra)],
                        "source_size": pa.array(range(n + extra), pa.int64()),
                        "source_mtime_ns": pa.array([1_700_000_000_000_000_000] * (n + extra), pa.int64()),
                        "source_etag": pa.nulls(n + extra, pa.string()),
                        "source_version_id": pa.nulls(n + extra, pa.string())}, schema=ENTRY_SCHEMA)
    listed = time.perf_counter()
    index = scored_index(str(Path(out) / "synthetic-scores"))
    new = new_work(listing, committed("", ModelRef("", "s", "1", None, None), ModelRef("", "c", "2", None, None),
                                      index=index))
    why = why_new(new, index)
    done = time.perf_counter()
    assert new.num_rows == extra and why == {"new": extra}, (new.num_rows, extra, why)
    print(json.dumps({"committed": n, "listed": n + extra, "new": new.num_rows,
                      "build_listing_seconds": listed - started, "decide_seconds": done - listed,
                      "peak_rss_gib": peak_rss_gib()}))


def real(n: int, source: str, out: Path) -> dict:
    """First run, nothing-new rerun, 1%-new rerun, and the new files alone."""
    import ray

    from cxr.workflows.benchmark import distinct_inputs
    from jobs.score import run

    files = [f for f in list_files(str(Path(source).resolve())) if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    uris = distinct_inputs(files, n, out / "inputs")
    archive = out / "archive"
    shutil.rmtree(archive, ignore_errors=True)
    archive.mkdir(parents=True)
    new_count = max(1, n // 100)
    for i, uri in enumerate(uris):          # the archive: n links; 1% more are added before the third run
        (archive / f"{i:08d}{Path(uri).suffix}").symlink_to(Path(uri).resolve())
    scores = out / "scores"
    shutil.rmtree(scores, ignore_errors=True)

    def timed(input_: Path, output: Path) -> tuple[dict, float, bool]:
        ray_was_up = ray.is_initialized()
        started = time.perf_counter()
        summary = run(ScoreConfig(input=str(input_), output=str(output)))
        return summary, time.perf_counter() - started, ray.is_initialized() and not ray_was_up

    first, first_s, _ = timed(archive, scores)
    ray.shutdown()                           # each rerun starts as a nightly job would: no Ray
    nothing, nothing_s, started_ray = timed(archive, scores)
    added = out / "added"
    shutil.rmtree(added, ignore_errors=True)
    added.mkdir()
    for i in range(new_count):
        target = Path(uris[i % len(uris)]).resolve()
        (archive / f"new-{i:06d}{target.suffix}").symlink_to(target)
        (added / f"new-{i:06d}{target.suffix}").symlink_to(target)
    ray.shutdown()
    some, some_s, _ = timed(archive, scores)
    ray.shutdown()
    alone, alone_s, _ = timed(added, out / "scores-alone")
    ray.shutdown()
    return {"images": n, "first": {"scored": first["scored"], "seconds": first_s},
            "nothing_new": {"scored": nothing["scored"], "seconds": nothing_s, "started_ray": started_ray,
                            "share_of_first": nothing_s / first_s},
            "one_percent_new": {"scored": some["scored"], "seconds": some_s},
            "new_files_alone": {"scored": alone["scored"], "seconds": alone_s},
            "one_percent_over_alone": some_s / alone_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, help="real images to score (the registry's champions)")
    p.add_argument("--input", default="data/sample", help="folder of real images, repeated as links if fewer")
    p.add_argument("--synthetic", type=int, help="committed inputs for the decision benchmark")
    p.add_argument("--out", default="out/rerun")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cxr.workflows.benchmark import machine

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    if args.synthetic:
        result["synthetic"] = synthetic(args.synthetic, out)
    if args.images:
        result["real"] = real(args.images, args.input, out)
    name = out / f"rerun-{'synthetic' if args.synthetic else 'real'}.json"
    name.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
