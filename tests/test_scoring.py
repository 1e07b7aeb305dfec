"""The scoring job against the loopback S3 server, a real local Ray and registered tiny models:
good and bad images, reruns, a kill -9 halfway, a flaky endpoint, systemic failures."""

import dataclasses
import datetime as dt
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr.config import REPO_ROOT, ExportSRConfig, ReportConfig, ScoreConfig, load_platform
from cxr.scores_table import SCHEMA, SCHEMA_VERSION, live_files, read_current, read_scores
from cxr.workflows.score import list_inputs
from jobs import report, score
from tests.conftest import platform_file
from tests.flaky_proxy import FlakyProxy
from tests.inputs import BAD_INPUTS, COMPRESSED_NAMES, dicom_bytes, real_gray, real_jpeg_bytes, tagged_dicom

BUCKET = "cxr-score"


def _real_images(sample_root, n):
    return sorted((sample_root / "kermany").rglob("*.jpg"))[:n // 2] + sorted((sample_root / "covid").rglob("*.jpg"))[:n - n // 2]


@pytest.fixture(scope="module")
def archive(local_stack, sample_root):
    """s3://cxr-score/archive: 12 real X-rays, one real DICOM and every bad-input kind."""
    s3 = local_stack.s3_client()
    local_stack.create_bucket(BUCKET)
    good = {}
    for path in _real_images(sample_root, 12):
        good[f"archive/good/{path.name}"] = path.read_bytes()
    good["archive/good/xray.dcm"] = dicom_bytes()
    for name in COMPRESSED_NAMES:          # real JPEGs under compressed-looking names: read as bytes
        good[f"archive/good/{name}"] = real_jpeg_bytes()
    bad = {f"archive/bad/{name}": make() for name, make in BAD_INPUTS.values()}
    for k, v in {**good, **bad}.items():
        s3.put_object(Bucket=BUCKET, Key=k, Body=v)
    return {"prefix": f"s3://{BUCKET}/archive", "good": {f"s3://{BUCKET}/{k}" for k in good},
            "bad": {f"s3://{BUCKET}/{k}": name for k, name in zip(bad, bad)},
            "sha256": {f"s3://{BUCKET}/{k}": hashlib.sha256(v).hexdigest() for k, v in {**good, **bad}.items()}}


def _cfg(tiny_models, **kw) -> ScoreConfig:
    return ScoreConfig(segmenter=tiny_models["segmenter"], classifier=tiny_models["classifier"], batch_size=4,
                       heatmap_size=32, **kw)


@pytest.fixture(scope="module")
def scored(archive, tiny_models, ray_local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scored") / "scores")
    return out, score.run(_cfg(tiny_models, input=archive["prefix"], output=out))


def test_scores_good_and_bad_images_one_row_each(scored, archive, tiny_models):
    out, summary = scored
    rows = read_scores(out).to_pandas()
    assert summary["scored"] == len(rows) == len(archive["good"]) + len(archive["bad"])
    assert sorted(rows["uri"]) == sorted(archive["good"] | set(archive["bad"]))
    assert list(read_scores(out).schema.names[:len(SCHEMA)]) == SCHEMA.names
    bad = rows[rows["uri"].isin(archive["bad"])]
    assert (bad["status"] == "error").all() and bad["error"].str.len().gt(5).all()
    assert bad["probabilities"].isna().all() and bad["heatmap_png"].isna().all() and bad["screen_positive"].isna().all()
    assert "empty file" in bad.set_index("uri").loc[f"s3://{BUCKET}/archive/bad/empty.jpg", "error"]
    good = rows[rows["uri"].isin(archive["good"])]
    assert good["status"].isin(["ok", "flagged"]).all() and good["error"].isna().all()
    for _, row in good.iterrows():
        assert abs(sum(row["probabilities"]) - 1) < 1e-4
        assert row["argmax_label"] == row["labels"][int(np.argmax(row["probabilities"]))]
        # One answer per film: covid exactly when screen-positive, else the most probable other class.
        others = [p if label != "covid" else -1 for label, p in zip(row["labels"], row["probabilities"])]
        assert row["predicted_label"] == ("covid" if row["screen_positive"] else row["labels"][int(np.argmax(others))])
        assert np.array(Image.open(io.BytesIO(row["heatmap_png"]))).shape == (32, 32)
        assert 0 <= row["lung_fraction"] <= 1 and len(row["sha256"]) == 64
        assert (row["status"] == "flagged") == bool(len(row["qc_flags"]))
        assert row["covid_threshold"] == 0.25                         # the tiny classifier card's
        assert row["screen_positive"] == (row["covid_probability"] >= 0.25)
    assert set(rows["classifier_version"]) == {tiny_models["classifier"].rsplit("/", 1)[1]}
    assert summary["screen_positive"] == int(good["screen_positive"].sum())
    assert rows["job_id"].nunique() == 1 and rows["scored_date"].nunique() == 1
    # Parts are sized by rows (rows_per_file 512), not by model batch (4): a handful, not ~9.
    assert summary["parts"] == len(live_files(out)[2]) <= 2
    # Incremental: a second run scores nothing new.
    again = score.run(_cfg(tiny_models, input=archive["prefix"], output=out))
    assert again["scored"] == 0 and again["already_scored"] == again["inputs"] and len(read_scores(out)) == len(rows)


def test_killed_run_restarted_ends_with_exactly_one_row_per_input(local_stack, archive, tiny_models, sample_root,
                                                                  tmp_path, capsys):
    s3 = local_stack.s3_client()
    uris = []
    for i, path in enumerate(_real_images(sample_root, 40) * 2):      # 80 inputs
        key = f"big/{i:03d}-{path.name}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        uris.append(f"s3://{BUCKET}/{key}")
    out = tmp_path / "scores"
    args = [sys.executable, "-m", "jobs.score", "--input", f"s3://{BUCKET}/big", "--output", str(out),
            "--segmenter", tiny_models["segmenter"], "--classifier", tiny_models["classifier"], "--batch-size", "2",
            "--rows-per-file", "2"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_scores(str(out))) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make the input bigger"
    # A second job on the same output meanwhile: it exits at once, naming the job that writes.
    assert score.main(_cfg(tiny_models, input=f"s3://{BUCKET}/big", output=str(out))) == 1
    err = capsys.readouterr().err.strip()
    assert "is being written by job" in err and f"pid {proc.pid}" in err and "\n" not in err, err
    os.killpg(proc.pid, signal.SIGKILL)                                # kill -9, driver and all
    proc.wait()
    partial = len(read_scores(str(out)))
    assert 0 < partial < len(uris)
    # The killed job's lease is left behind; its process is gone, so this job takes it at once.
    summary = score.run(_cfg(tiny_models, input=f"s3://{BUCKET}/big", output=str(out)))
    rows = read_scores(str(out)).to_pandas()
    assert summary["scored"] == len(uris) - partial
    assert sorted(rows["uri"]) == sorted(uris)                         # no duplicates, no gaps


def test_flaky_storage_endpoint_still_completes(local_stack, archive, tiny_models, ray_local, tmp_path, monkeypatch):
    """503s on every third request are absorbed by retries; an object the store refuses (403)
    is that input's error row; every other image comes back ok with its real sha256."""
    forbidden = sorted(archive["good"])[0]
    with FlakyProxy(local_stack.s3_endpoint, fail_every=3,
                    forbidden={forbidden.removeprefix("s3://")}) as proxy:
        monkeypatch.setenv("CXR_S3_ENDPOINT", proxy.endpoint)
        assert load_platform().storage.s3_endpoint == proxy.endpoint
        out = str(tmp_path / "scores")
        summary = score.run(_cfg(tiny_models, input=archive["prefix"], output=out))
        assert proxy.failed > 5
    rows = read_scores(out).to_pandas().set_index("uri")
    assert summary["scored"] == len(rows) == len(archive["good"]) + len(archive["bad"])
    assert rows.loc[forbidden, "status"] == "error" and "S3 403 Forbidden" in rows.loc[forbidden, "error"]
    good = rows.loc[sorted(archive["good"] - {forbidden})]
    assert good["status"].isin(["ok", "flagged"]).all()
    assert list(good["sha256"]) == [archive["sha256"][u] for u in good.index]


def test_unsupported_uris_in_a_manifest_are_error_rows(archive, tiny_models, ray_local, tmp_path):
    import pandas as pd

    good = sorted(archive["good"])[:2]
    odd = ["http://pacs.example/1.jpg", "gs://bucket/2.png", "ftp://host/3.dcm"]
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"uri": good + odd}).to_parquet(manifest)
    summary = score.run(_cfg(tiny_models, input=str(manifest), output=str(tmp_path / "scores")))
    rows = read_scores(str(tmp_path / "scores")).to_pandas().set_index("uri")
    assert summary["scored"] == 5 and rows.loc[good, "status"].isin(["ok", "flagged"]).all()
    for uri in odd:
        assert rows.loc[uri, "status"] == "error" and "unsupported URI scheme" in rows.loc[uri, "error"]


def test_systemic_failures_exit_1_with_one_line(tiny_models, archive, ray_local, tmp_path, capsys):
    missing = dataclasses.replace(_cfg(tiny_models, input=archive["prefix"], output=str(tmp_path / "a")),
                                  classifier="models:/cxr-classifier@no-such-alias")
    assert score.main(missing) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr score: cannot resolve models:/cxr-classifier@no-such-alias") and "\n" not in err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert score.main(_cfg(tiny_models, input=archive["prefix"], output=str(blocker / "scores"))) == 1
    assert "not writable" in capsys.readouterr().err
    # A missing bucket, a prefix with no object, an output inside the input: one line each.
    for source, reason in ((f"s3://no-such-bucket-{os.getpid()}/x", "S3 bucket no-such-bucket"),
                           (f"{archive['prefix']}-typo", "holds no object")):
        assert score.main(_cfg(tiny_models, input=source, output=str(tmp_path / "b"))) == 1
        err = capsys.readouterr().err.strip()
        assert reason in err and "\n" not in err, err
    (tmp_path / "in").mkdir()
    assert score.main(_cfg(tiny_models, input=str(tmp_path / "in"), output=str(tmp_path / "in" / "scores"))) == 1
    assert "is inside the input" in capsys.readouterr().err
    # An empty folder is no work: a warning, exit 0.
    assert score.main(_cfg(tiny_models, input=str(tmp_path / "in"), output=str(tmp_path / "c"))) == 0
    assert "0 inputs" in capsys.readouterr().out


def test_an_unreachable_tracking_server_fails_within_30_s(tiny_models, tmp_path, monkeypatch, capsys):
    from infra.local.stack import free_port
    from jobs.cli import main as cli

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "0")       # recorded, so what the job sets is undone after the test
        monkeypatch.delenv(name)            # the job's own defaults, as in production
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert cli(["score", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                "--classifier", tiny_models["classifier"]]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr score: cannot resolve") and "\n" not in err



def test_report_is_a_self_contained_page_of_the_run(scored, tmp_path):
    out, summary = scored
    page = tmp_path / "report.html"
    assert report.main(ReportConfig(scores=out, out=str(page), top=3)) == 0
    text = page.read_text()
    assert summary["job_id"] in text and "Research use, not for diagnosis" in text
    assert text.count("data:image/png;base64,") >= 3                  # overlays are inline
    assert "empty file (0 bytes)" in text                             # errors are listed with reasons
    assert "COVID-19 screen at the card threshold" in text
    assert "positive (&gt;= 0.250)" in text or "negative (&lt; 0.250)" in text
    assert "http" not in text.replace("http://127.0.0.1", "")         # nothing fetched from elsewhere


def test_the_report_reads_one_job_and_only_the_heatmaps_it_shows(scored, tmp_path):
    from cxr.report import read_job, shown

    out, summary = scored
    rows = read_job(out, summary["job_id"], 3, 0, None)                # one job; 3 cards of each kind
    assert set(rows["job_id"]) == {summary["job_id"]} and len(rows) == summary["scored"]
    positives, highest, flagged = shown(rows, 3, 0)
    assert rows["covid_heatmap_png"].notna().sum() == len(pd.concat([positives, highest, flagged])["uri"].unique())
    assert read_job(out, "no-such-job", 3, 0, None).empty
    night = read_job(out, None, 3, 0, None)                            # the latest night: every input's current row
    assert len(night) == summary["scored"] and night["uri"].is_unique


def test_review_notebook_runs(scored, monkeypatch):
    """notebooks/review_scores.ipynb, every code cell in order, on the run above."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    monkeypatch.setenv("CXR_SCORES", str(Path(scored[0]).resolve()))
    notebook = json.loads((REPO_ROOT / "notebooks" / "review_scores.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "review_scores.ipynb", "exec"), namespace)
    assert len(namespace["rows"]) == scored[1]["scored"]


def test_benchmark_compares_pipeline_and_naive_loop_on_the_same_images(tiny_models, sample_root, ray_local, tmp_path):
    """Runs, and reports what it measured; the figures themselves belong in docs/RESULTS.md."""
    import json

    from cxr.config import BenchmarkConfig
    from jobs import benchmark

    cfg = BenchmarkConfig(input=str(sample_root / "covid"), images=6, segmenter=tiny_models["segmenter"],
                          classifier=tiny_models["classifier"], batch_size=4, out=str(tmp_path))
    assert benchmark.main(cfg) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["pipeline"]["scored"] == result["naive"]["scored"] == 6
    assert result["speedup"] > 0 and result["pipeline"]["peak_memory_gib"] > 0
    assert result["pipeline"]["startup_s"] > 0 and result["pipeline"]["steady_seconds"] >= 0


def test_benchmark_repeats_local_files_under_distinct_uris(sample_root, tmp_path):
    """cxr score scores a URI once, so a benchmark larger than its folder links each file again."""
    from cxr.workflows.benchmark import distinct_inputs

    files = [str(p) for p in sorted((sample_root / "covid").rglob("*.jpg"))[:3]]
    uris = distinct_inputs(files, 7, tmp_path / "inputs")
    assert len(set(uris)) == 7
    assert [open(u, "rb").read() for u in uris[3:6]] == [open(f, "rb").read() for f in files]
    assert distinct_inputs(files, 2, tmp_path / "unused") == files[:2]


def test_a_uri_named_twice_is_scored_once(sample_root, tmp_path):
    import pandas as pd

    files = [str(p) for p in sorted((sample_root / "covid").rglob("*.jpg"))[:2]]
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"uri": files + files[:1]}).to_parquet(manifest)
    assert list_inputs(ScoreConfig(input=str(manifest)), None).read_all().column("uri").to_pylist() == files


def test_parts_of_an_older_schema_read_with_nulls_in_the_new_columns(tmp_path):
    """Schema version 1 had no covid_threshold / screen_positive: an output holding parts of both
    versions reads whole, whichever part comes first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def part(name: str, schema: pa.Schema, version: str) -> None:
        row = {f.name: [None] for f in schema}
        row.update(uri=[f"s3://b/{name}.jpg"], status=["ok"], schema_version=[version], screen_positive=[True])
        folder = tmp_path / "scores" / "scored_date=2026-11-26"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pydict({k: row[k] for k in schema.names}, schema=schema), folder / f"{name}.parquet")

    v1 = pa.schema([f for f in SCHEMA if f.name not in ("covid_threshold", "screen_positive")])
    part("a-old", v1, "1")
    part("b-new", SCHEMA, "2")
    rows = read_scores(str(tmp_path / "scores")).to_pandas().set_index("uri")
    assert list(rows["schema_version"]) == ["1", "2"]
    assert rows.loc["s3://b/a-old.jpg", "screen_positive"] is None
    assert bool(rows.loc["s3://b/b-new.jpg", "screen_positive"]) is True
    assert set(rows["scored_date"]) == {"2026-11-26"}


def test_a_failing_store_stops_the_job_naming_the_first_input(local_stack, archive, tiny_models,
                                                               ray_local, tmp_path, monkeypatch, capsys):
    """Storage errors after retries on most of a batch are the store, not the files: the job
    stops (exit 1) with one line naming the first input and its error, and writes no rows."""
    keys = {u.removeprefix("s3://") for u in archive["good"] | set(archive["bad"])}
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(platform_file(tmp_path, storage={"max_attempts": 2})))
    with FlakyProxy(local_stack.s3_endpoint, fail_every=10**9, down=keys) as proxy:
        monkeypatch.setenv("CXR_S3_ENDPOINT", proxy.endpoint)
        out = tmp_path / "scores"
        assert score.main(_cfg(tiny_models, input=archive["prefix"], output=str(out))) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "storage failed for" in err and "storage error:" in err
    assert f"first s3://{BUCKET}/archive/" in err
    assert len(read_scores(str(out))) == 0


def test_an_input_without_sha256_is_not_scored_again(tmp_path, sample_root):
    """A file too large to read has no sha256; its error row must still count as scored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.new_work import decide
    from cxr.scores_table import to_schema
    from cxr.scoring import ModelRef, decode_batch

    big = str(sorted((sample_root / "covid").rglob("*.jpg"))[0])
    seg = ModelRef("models:/s/1", "s", "1", None, None)
    cls = ModelRef("models:/c/2", "c", "2", None, None)
    first = decode_batch({"uri": np.array([big], dtype=object)}, (64, 64), 128, set(), 100, None)
    assert first["sha256"][0] is None and "file too large" in first["error"][0]
    row = {f.name: [None] for f in SCHEMA}
    row.update(uri=[big], status=["error"], error=[first["error"][0]], segmenter_name=["s"], segmenter_version=["1"],
               classifier_name=["c"], classifier_version=["2"], qc_flags=[[]])
    (tmp_path / "scores" / "scored_date=2026-11-27").mkdir(parents=True)
    pq.write_table(to_schema(pa.Table.from_pydict(row, schema=SCHEMA)),
                   tmp_path / "scores" / "scored_date=2026-11-27" / "part-0.parquet")
    listing = pa.table({"uri": [big], "source_size": [1], "source_mtime_ns": [1], "source_etag": [None],
                        "source_version_id": [None]})
    skip = decide(listing, str(tmp_path / "scores"), seg, cls).skip
    again = decode_batch({"uri": np.array([big], dtype=object)}, (64, 64), 128, skip, 100, None)
    assert len(again["uri"]) == 0


def test_a_storage_error_row_is_tried_again_next_run(tmp_path):
    """Unlike a bad file, an object the store did not give us (403, a blip after retries) is not
    'scored': the next run reads it again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.new_work import decide
    from cxr.scores_table import to_schema
    from cxr.scoring import ModelRef

    rows = {f.name: [None, None] for f in SCHEMA}
    rows.update(uri=["s3://b/refused.jpg", "s3://b/broken.jpg"], sha256=[None, "ab" * 32], status=["error"] * 2,
                error=["S3 403 Forbidden (no permission to read this object): ...", "empty file (0 bytes)"],
                segmenter_name=["s"] * 2, segmenter_version=["1"] * 2, classifier_name=["c"] * 2,
                classifier_version=["2"] * 2, qc_flags=[[], []],
                scored_at=[dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)] * 2)   # after the files' mtime
    (tmp_path / "scored_date=2026-11-27").mkdir()
    pq.write_table(to_schema(pa.Table.from_pydict(rows, schema=SCHEMA)), tmp_path / "scored_date=2026-11-27" / "p.parquet")
    listing = pa.table({"uri": ["s3://b/refused.jpg", "s3://b/broken.jpg"], "source_size": [1, 1],
                        "source_mtime_ns": [1, 1], "source_etag": [None] * 2, "source_version_id": [None] * 2})
    decision = decide(listing, str(tmp_path), ModelRef("", "s", "1", None, None), ModelRef("", "c", "2", None, None))
    assert decision.skip == {"s3://b/broken.jpg\t" + "ab" * 32}
    assert decision.inputs["uri"].to_pylist() == ["s3://b/refused.jpg"] and decision.why == {"retry": 1}


def test_a_rerun_decides_from_metadata_and_reads_no_bytes(local_stack, tiny_models, sample_root, ray_local, tmp_path,
                                                           monkeypatch):
    """Through a proxy that records every request: the second run lists the prefix and reads
    the committed rows' listing columns, but never GETs an image; a changed file (new bytes,
    new size) is scored again."""
    s3 = local_stack.s3_client()
    local_stack.create_bucket(BUCKET)
    keys = [f"meta/{p.name}" for p in _real_images(sample_root, 6)]
    for k, p in zip(keys, _real_images(sample_root, 6)):
        s3.put_object(Bucket=BUCKET, Key=k, Body=p.read_bytes())
    out = str(tmp_path / "scores")
    first = score.run(_cfg(tiny_models, input=f"s3://{BUCKET}/meta", output=out, limit=4))
    assert (first["scored"], first["deferred"], first["already_scored"]) == (4, 2, 0)   # a backlog worked through
    rest = score.run(_cfg(tiny_models, input=f"s3://{BUCKET}/meta", output=out))
    assert (rest["scored"], rest["deferred"], rest["already_scored"]) == (2, 0, 4)
    with FlakyProxy(local_stack.s3_endpoint, fail_every=10**9) as proxy:
        monkeypatch.setenv("CXR_S3_ENDPOINT", proxy.endpoint)
        again = score.run(_cfg(tiny_models, input=f"s3://{BUCKET}/meta", output=out))
        object_reads = [path for method, path in proxy.requests if method == "GET" and "/meta/" in path.split("?")[0]]
        assert again["scored"] == 0 and again["already_scored"] == 6 and object_reads == []
        s3.put_object(Bucket=BUCKET, Key=keys[0], Body=_real_images(sample_root, 8)[-1].read_bytes())
        changed = score.run(_cfg(tiny_models, input=f"s3://{BUCKET}/meta", output=out))
    assert changed["scored"] == 1 and changed["why"] == {"changed": 1}
    rows = read_scores(out).to_pandas()
    assert rows["source_size"].notna().all() and (rows["schema_version"] == SCHEMA_VERSION).all()
    assert rows["source_etag"].notna().all()                               # from the listing, for lineage
    assert len(rows[rows["uri"] == f"s3://{BUCKET}/{keys[0]}"]) == 2       # the old row is kept (history) ...
    current = read_current(out).to_pandas()
    assert sorted(current["uri"]) == sorted(f"s3://{BUCKET}/{k}" for k in keys)   # ... but one row is current:
    assert current.set_index("uri").loc[f"s3://{BUCKET}/{keys[0]}", "job_id"] == changed["job_id"]  # the new one
    # The same objects named by an S3 Inventory report: the same identities, so nothing to do.
    objects = s3.list_objects_v2(Bucket=BUCKET, Prefix="meta/")["Contents"]
    inventory = tmp_path / "inventory.parquet"
    pq.write_table(pa.table({"bucket": [BUCKET] * len(objects), "key": [o["Key"] for o in objects],
                             "size": [o["Size"] for o in objects],
                             "last_modified_date": [o["LastModified"] for o in objects],
                             "e_tag": [o["ETag"] for o in objects]}), inventory)
    assert score.run(_cfg(tiny_models, input=str(inventory), output=out))["scored"] == 0
    # Another classifier: a planned backfill of every input; its rows become the current ones.
    backfill = score.run(dataclasses.replace(_cfg(tiny_models, input=f"s3://{BUCKET}/meta", output=out),
                                             classifier=tiny_models["classifier_nomask"]))
    assert backfill["scored"] == 6 and backfill["why"] == {"backfill": 6}
    current = read_current(out, columns=["uri", "classifier_name"]).to_pandas()
    assert len(current) == 6 and (current["classifier_name"] == tiny_models["classifier_nomask"].split("/")[1]).all()


def test_a_manifest_listing_never_fails_on_one_uri(tmp_path, sample_root):
    """One path the filesystem will not describe, a file:// URI, an unsupported scheme: each
    gets its own entry, the listing goes on."""
    from cxr.data.storage import stat_entries

    real = sorted((sample_root / "covid").rglob("*.jpg"))[0]
    too_long = str(tmp_path / ("x" * 300) / "a.jpg")
    entries = stat_entries([str(real), too_long, f"file://{real}", "gs://b/k.png"]).to_pydict()
    assert entries["source_size"] == [real.stat().st_size, -1, real.stat().st_size, -1]
    assert entries["source_mtime_ns"][2] == real.stat().st_mtime_ns


def test_local_read_errors_are_rows_not_an_outage(tmp_path):
    """An errno on a local file is that file's; only store-wide failures count towards stopping."""
    from cxr.scoring import decode_batch

    uris = [str(tmp_path / ("x" * 300) / f"{i}.jpg") for i in range(3)]
    out = decode_batch({"uri": np.array(uris, dtype=object)}, (64, 64), 128, set(), 10**6, None)
    assert list(out["status"]) == ["error"] * 3


def test_rows_from_before_version_3_count_as_done_while_the_file_is_unchanged(tmp_path, sample_root):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.data.storage import list_entries
    from cxr.new_work import decide
    from cxr.scores_table import to_schema
    from cxr.scoring import ModelRef

    folder = tmp_path / "archive"
    folder.mkdir()
    for p in sorted((sample_root / "covid").rglob("*.jpg"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    listing = list_entries(str(folder))
    uris = listing.column("uri").to_pylist()
    rows = {f.name: [None, None] for f in SCHEMA}
    rows.update(uri=uris, status=["ok"] * 2, segmenter_name=["s"] * 2, segmenter_version=["1"] * 2,
                classifier_name=["c"] * 2, classifier_version=["2"] * 2, qc_flags=[[], []], schema_version=["2"] * 2,
                scored_at=[dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)] * 2)   # scored after the copy
    (tmp_path / "scores" / "scored_date=2026-11-26").mkdir(parents=True)
    pq.write_table(to_schema(pa.Table.from_pydict(rows, schema=SCHEMA)),
                   tmp_path / "scores" / "scored_date=2026-11-26" / "p.parquet")
    seg, cls = ModelRef("", "s", "1", None, None), ModelRef("", "c", "2", None, None)
    assert decide(listing, str(tmp_path / "scores"), seg, cls).inputs.num_rows == 0
    later = time.time() + 60                        # one file modified after it was scored
    os.utime(uris[0], (later, later))
    assert decide(list_entries(str(folder)), str(tmp_path / "scores"), seg, cls).inputs.column("uri").to_pylist() \
        == uris[:1]


def test_why_each_input_is_scored_again(tmp_path):
    """new, changed, retry (a storage error is current), backfill (other models): counted apart;
    an older row of an input is history, its newest row decides; --limit cuts the work by uri."""
    import pyarrow.parquet as pq

    from cxr.data.storage import ENTRY_SCHEMA
    from cxr.new_work import decide
    from cxr.scores_table import to_schema
    from cxr.scoring import ModelRef

    uris = ["s3://b/new.jpg", "s3://b/changed.jpg", "s3://b/refused.jpg", "s3://b/other-model.jpg", "s3://b/done.jpg"]
    index = {f.name: [None] * 4 for f in SCHEMA}
    index.update(uri=uris[1:], source_size=[10, 10, 10, 10], source_mtime_ns=[1, 1, 1, 1], qc_flags=[[]] * 4,
                 error=[None, "S3 403 Forbidden (no permission to read this object): ...", None, None],
                 segmenter_name=["s"] * 4, segmenter_version=["1"] * 4, classifier_name=["c", "c", "c-old", "c"],
                 classifier_version=["2"] * 4, job_id=["j"] * 4,
                 scored_at=[dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)] * 4)
    older = {f.name: [None] for f in SCHEMA}         # history: done.jpg once scored by other models
    older.update(uri=uris[4:], source_size=[10], source_mtime_ns=[1], qc_flags=[[]], segmenter_name=["s"],
                 segmenter_version=["1"], classifier_name=["c-old"], classifier_version=["2"], job_id=["j0"],
                 scored_at=[dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)])
    (tmp_path / "scored_date=2026-11-27").mkdir()
    pq.write_table(to_schema(pa.Table.from_pydict(index, schema=SCHEMA)), tmp_path / "scored_date=2026-11-27" / "a.parquet")
    pq.write_table(to_schema(pa.Table.from_pydict(older, schema=SCHEMA)), tmp_path / "scored_date=2026-11-27" / "b.parquet")
    listing = pa.table({"uri": uris, "source_size": [5, 11, 10, 10, 10], "source_mtime_ns": [1, 1, 1, 1, 1],
                        "source_etag": [None] * 5, "source_version_id": [None] * 5}, schema=ENTRY_SCHEMA)
    models = ModelRef("", "s", "1", None, None), ModelRef("", "c", "2", None, None)
    decision = decide(listing, str(tmp_path), *models)
    assert decision.inputs["uri"].to_pylist() == sorted(uris[:4]) and (decision.listed, decision.unscored) == (5, 4)
    assert decision.why == {"new": 1, "changed": 1, "retry": 1, "backfill": 1}
    limited = decide(listing, str(tmp_path), *models, limit=2)
    assert limited.inputs["uri"].to_pylist() == sorted(uris[:4])[:2] and limited.unscored == 4
    # Where DuckDB is not installed (the GPU machine), the in-memory path decides the same.
    from cxr.new_work import _decide_in_memory

    for limit, expected in ((None, decision), (2, limited)):
        other = _decide_in_memory(listing, str(tmp_path), *models, None, limit)
        assert (other.listed, other.unscored, other.inputs["uri"].to_pylist(), other.why, other.skip) == \
            (expected.listed, expected.unscored, expected.inputs["uri"].to_pylist(), expected.why, expected.skip)


def test_dicom_identity_and_routing_reach_the_scores_table(tiny_models, ray_local, tmp_path, monkeypatch):
    """Real DICOMs made from a sample film with a modality's tags, a photo and noise, scored by
    the job: identifiers (pseudonymised) in the rows, lateral / CT / non-chest skipped with the
    reason and never run through the models."""
    from tests.test_dicom_routing import write_archive

    monkeypatch.setenv("CXR_PSEUDONYM_KEY", "site-secret")
    (tmp_path / "archive").mkdir()
    write_archive(tmp_path / "archive", real_gray())
    out = str(tmp_path / "scores")
    summary = score.run(_cfg(tiny_models, input=str(tmp_path / "archive"), output=out))
    rows = read_scores(out).to_pandas().set_index("uri")
    rows.index = [u.rsplit("/", 1)[1] for u in rows.index]
    assert summary["by_status"].get("skipped") == 3 and summary["scored"] == 7
    page = tmp_path / "report.html"
    assert report.main(ReportConfig(scores=out, out=str(page))) == 0
    text = page.read_text()
    assert "Skipped: not a frontal chest radiograph (3)" in text and "lateral view (ViewPosition LL)" in text
    assert ": negative" not in text and ": positive" not in text      # the old, inverted-looking labels
    skipped = rows[rows["status"] == "skipped"]
    assert sorted(skipped.index) == ["ct.dcm", "hand.dcm", "lateral.dcm"]
    assert skipped["skip_reason"].str.len().gt(10).all() and skipped["probabilities"].isna().all()
    assert skipped["heatmap_png"].isna().all() and skipped["error"].isna().all()
    assert rows.loc["pa.dcm", "status"] in ("ok", "flagged") and rows.loc["pa.dcm", "modality"] == "CR"
    assert rows.loc["pa.dcm", "patient_id"].startswith("pseudo-")
    assert rows.loc["pa.dcm", "patient_id"] == rows.loc["lateral.dcm", "patient_id"]
    assert rows.loc["ap", "view_position"] == "AP" and rows.loc["ap", "study_instance_uid"]
    assert rows.loc["pa.dcm", "image_height"] == real_gray().shape[0]
    assert rows[["study_instance_uid", "patient_id"]].loc[["photo.jpg", "noise.png"]].isna().all().all()
    assert set(rows["schema_version"]) == {SCHEMA_VERSION}

    # Back to the PACS: one SR per scored study, naming the scored images; the worklist.
    from cxr.dicom_sr import read_back
    from jobs import export_sr

    sr_out = tmp_path / "sr"
    assert export_sr.main(ExportSRConfig(scores=out, out=str(sr_out))) == 0
    reports = sorted(sr_out.glob("*.dcm"))
    assert sorted(p.stem for p in reports) == sorted(rows.loc[["pa.dcm", "ap"], "study_instance_uid"])
    back = {b["sop_instance_uid"]: b for p in reports for b in read_back(p)}
    assert set(back) == set(rows.loc[["pa.dcm", "ap"], "sop_instance_uid"])      # the lateral is not in its study's
    pa_sr = back[rows.loc["pa.dcm", "sop_instance_uid"]]
    assert pa_sr["patient_id"] == "P1"                 # the PACS's own identifier, from the source header
    assert abs(pa_sr["covid_probability"] - rows.loc["pa.dcm", "covid_probability"]) < 1e-6
    assert pa_sr["screen"] == ("Positive" if rows.loc["pa.dcm", "screen_positive"] else "Negative")
    worklist = pd.read_csv(sr_out / "worklist.csv")
    assert len(worklist) == int(rows["screen_positive"].fillna(False).astype(bool).sum())
    assert list(worklist["covid_probability"]) == sorted(worklist["covid_probability"], reverse=True)
    assert pd.read_csv(sr_out / "errors.csv").empty
    # The algorithm is named by what it is (cxr's version, the weights' digest, the threshold),
    # not by a registry's version number.
    from cxr.tracking import cxr_version

    texts = [str(e.value) for e in pydicom.dcmread(reports[0]).iterall() if e.keyword == "TextValue"]
    assert cxr_version() in texts and any(t.startswith("covid threshold 0.") for t in texts)
    assert any(len(t) == len("weights sha256 ") + 64 and t.startswith("weights sha256 ") for t in texts), texts
    # A file replaced after scoring (another image, other UIDs) is refused, never reported as scored.
    (tmp_path / "archive" / "pa.dcm").write_bytes(tagged_dicom(real_gray()[::-1], "CR", "PA", patient_id="P1"))
    assert export_sr.main(ExportSRConfig(scores=out, out=str(tmp_path / "sr2"))) == export_sr.EXIT_STUDIES_FAILED
    refused = pd.read_csv(tmp_path / "sr2" / "errors.csv")
    assert list(refused["study_instance_uid"]) == [rows.loc["pa.dcm", "study_instance_uid"]]
    assert "changed since it was scored" in refused["error"][0]
    assert not (tmp_path / "sr2" / f"{rows.loc['pa.dcm', 'study_instance_uid']}.dcm").exists()


def chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium: `make setup` installs it (the Debian package chromium)"
    return found


def test_the_review_page_in_a_real_browser(scored, tmp_path):
    """The page as headless Chromium renders it: its sections and labels, and a screenshot that
    is not blank (docs/review-page.jpg is one, of the demo)."""
    out, summary = scored
    page = tmp_path / "report.html"
    assert report.main(ReportConfig(scores=out, out=str(page), top=3)) == 0
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for heading in ("Summary", "Screen-positive (", "Highest COVID-19 probability", "Flagged by quality control",
                    "Skipped: not a frontal chest radiograph", "Errors ("):
        assert heading in dom, heading
    assert "heatmap: <b>COVID-19</b>" in dom                           # each map says which class it shows
    assert "positive (&gt;= 0.250)" in dom or "negative (&lt; 0.250)" in dom
    assert dom.count("empty file (0 bytes)") == 1
    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 20               # drawn, not a blank page
    assert ((pixels[..., 0] > 150) & (pixels[..., 2] < 100)).sum() > 500        # the heatmaps' colours are there
