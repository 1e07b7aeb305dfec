"""What a nightly rerun costs (issues 13 and 23): the figures of docs/RESULTS.md's "Reruns" and
"Ten million inputs" sections.

Two modes:

- ``--images N``: ``cxr score`` on N real images (local files, repeated as distinct links where
  the folder has fewer), then the same listing again with nothing new, then with 1% new files,
  and those new files alone into a fresh output. Wall time of each, and whether the
  nothing-new rerun started Ray.
- ``--synthetic M [M ...]``: deciding what is new at M inputs with no model at all. An output
  holding M committed rows (synthetic listing columns, no heatmaps) is written in parts of
  ``--part-rows``, then, each in a fresh process as a nightly driver: the scoring driver's own
  decision (``cxr.new_work.decide``) over a listing of M + 1% entries streamed as a listing is
  read; reading every current row a batch at a time (``cxr.scores_table.current_batches``);
  and with ``--compact``, ``cxr compact`` on it. Reports the time and the peak memory of each
  process, and from several M a linear fit to 100 million.

    python -m experiments.rerun --images 2000 --input data/sample --out out/rerun
    python -m experiments.rerun --synthetic 1000000 3000000 10000000 --compact --out out/rerun
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxr.config import ScoreConfig
from cxr.data.storage import ENTRY_SCHEMA, list_files
from cxr.scoring import SCHEMA, ModelRef

# cxr.workflows.benchmark (and torch with it) is imported where used: the decision's memory is
# measured in a process that imports only what the scoring driver does.


def peak_rss_gib() -> float:
    """This process's peak resident memory: the kernel's VmHWM, which starts afresh at exec
    (``ru_maxrss`` does not: a child started by the benchmark reported the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20                      # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


MODELS = (ModelRef("", "s", "1", None, None), ModelRef("", "c", "2", None, None))


def synthetic(n: int, out: Path, part_rows: int, compact: bool) -> dict:
    """Deciding what is new, reading the current rows and compacting, at ``n`` committed inputs."""
    scores = out / "synthetic-scores"
    root = scores / "scored_date=2026-11-27"
    shutil.rmtree(scores, ignore_errors=True)
    root.mkdir(parents=True)
    written = time.perf_counter()
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
    result = {"committed": n, "parts": -(-n // part_rows), "write_seconds": time.perf_counter() - written}
    # Each step runs in a fresh process, as a nightly driver would: its peak memory is its own,
    # not the writing of the synthetic output above.
    for step in ("decide", "read_current") + (("compact",) if compact else ()):
        code = f"from experiments.rerun import {step}; {step}({n}, {str(scores)!r})"
        reply = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if reply.returncode:
            raise RuntimeError(f"{step} at {n:,} failed: {reply.stderr.strip().splitlines()[-1]}")
        result[step] = json.loads(reply.stdout.strip().splitlines()[-1])
        print(f"{n:>12,} {step}: {result[step]}", file=sys.stderr)
    return result


def listing_batches(n: int, page_rows: int = 100_000):
    """A listing of ``n`` entries, a page at a time, as ``entry_batches`` yields one."""
    for start in range(0, n, page_rows):
        stop = min(n, start + page_rows)
        yield pa.RecordBatch.from_pydict(
            {"uri": [f"s3://archive/{i:09d}.dcm" for i in range(start, stop)],
             "source_size": pa.array(range(start, stop), pa.int64()),
             "source_mtime_ns": pa.array([1_700_000_000_000_000_000] * (stop - start), pa.int64()),
             "source_etag": pa.nulls(stop - start, pa.string()),
             "source_version_id": pa.nulls(stop - start, pa.string())}, schema=ENTRY_SCHEMA)


def decide(n: int, scores: str) -> None:
    """The decision over a listing of n + 1% entries; one JSON line of figures."""
    from cxr.new_work import decide as decide_new_work

    extra = n // 100
    started = time.perf_counter()
    decision = decide_new_work(listing_batches(n + extra), scores, *MODELS)
    done = time.perf_counter()
    assert decision.inputs.num_rows == extra and decision.why == {"new": extra}, (decision.inputs.num_rows, decision.why)
    print(json.dumps({"listed": decision.listed, "new": decision.inputs.num_rows, "seconds": done - started,
                      "peak_rss_gib": peak_rss_gib()}))


def read_current(n: int, scores: str) -> None:
    """Every current row, a batch at a time (uri, status and the probabilities)."""
    from cxr.scores_table import current_batches

    started, rows = time.perf_counter(), 0
    for batch in current_batches(scores, columns=["uri", "status", "probabilities"]):
        rows += batch.num_rows
    assert rows == n, (rows, n)
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib()}))


def compact(n: int, scores: str) -> None:
    from cxr.scores_table import compact as compact_scores

    started = time.perf_counter()
    merged = compact_scores(scores)
    print(json.dumps({**merged, "seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib()}))


def scaling(results: list[dict]) -> dict:
    """Least-squares lines through the measured (inputs, seconds) and (inputs, peak memory) of
    each step, read at 100 million."""
    import numpy as np

    xs = np.array([r["committed"] for r in results], float)
    fits = {}
    for step in ("decide", "read_current", "compact"):
        if len(xs) < 2 or not all(step in r for r in results):
            continue
        for figure in ("seconds", "peak_rss_gib"):
            ys = np.array([r[step][figure] for r in results], float)
            slope, intercept = np.polyfit(xs, ys, 1)
            fits[f"{step}_{figure}_at_100M"] = float(slope * 1e8 + intercept)
            fits[f"{step}_{figure}_per_million"] = float(slope * 1e6)
    return fits


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
    p.add_argument("--synthetic", type=int, nargs="+", help="committed inputs for the decision benchmark (several: a scaling curve)")
    p.add_argument("--part-rows", type=int, default=20_000, help="rows per synthetic part (small parts, as nightly runs write)")
    p.add_argument("--compact", action="store_true", help="also time cxr compact on each synthetic table")
    p.add_argument("--out", default="out/rerun")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cxr.workflows.benchmark import machine

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    if args.synthetic:
        result["synthetic"] = [synthetic(n, out, args.part_rows, args.compact) for n in args.synthetic]
        result["scaling"] = scaling(result["synthetic"])
    if args.images:
        result["real"] = real(args.images, args.input, out)
    name = out / f"rerun-{'synthetic' if args.synthetic else 'real'}.json"
    name.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
