"""The dirty-archive check of issue 13: every bad-input kind beside real X-rays, scored by the
real ``cxr score`` job on local disk and on the loopback S3 server, to exactly one row per input
and with no job stop.

What it does, in a temporary folder:

1. Builds an archive: real X-rays of the shipped sample (kermany and covid JPEGs), a real
   DICOM, real JPEGs named ``*.gz``/``*.bz2``/``*.lz4``/``*.zst``, every kind of
   ``tests.inputs.BAD_INPUTS`` (the decoder's table in docs/RESULTS.md), a zero-byte file, a
   file over ``--max-file-mb``, a directory-looking key (an empty folder on disk, a ``folder/``
   marker object on S3) and an object that the store will refuse (403) in the third run.
2. Starts the loopback stack (MLflow + moto S3 on free ports, ``infra.local.stack``),
   registers an untrained tiny segmenter and a classifier lung-masked by it (``tests.models``,
   as the test fixtures do) and uploads the archive to ``s3://cxr-dirty/archive``.
3. Runs ``cxr score`` three times, each as its own process as the CLI runs it
   (``python -m jobs.cli score ...``): (a) the local folder, (b) the S3 prefix, (c) a manifest
   Parquet whose ``uri`` column lists the S3 objects, a missing object, the folder marker, an
   ``http://`` and a ``gs://`` URI and one URI twice, read through ``tests.flaky_proxy`` (403
   for ``bad/forbidden.jpg``; with ``--fail-every N``, also a 503 SlowDown every Nth request).
   Run (a) writes its scores to local disk, (b) to ``s3://cxr-dirty-scores/s3`` and (c) to
   ``s3://cxr-dirty-scores/manifest`` through the proxy.
4. Checks each run: exit 0; exactly one row per input and the set of row URIs equal to the
   inputs; each good input ``ok`` (or ``flagged``: scored, with quality flags) with the sha256
   of its bytes; each bad kind an ``error`` row with its reason (for the decoder's kinds, the
   exact reason ``decode_image`` gives for the same bytes).
5. Writes ``<out>/dirty_archive.json`` and ``<out>/dirty_archive.md`` (kind | file | local
   disk | S3 prefix | S3 manifest | error text) and prints the table.

``--extra`` adds edge cases found while writing this check (names and keys rather than
contents): a file name with spaces, ``#``, ``%``, ``?`` and non-ASCII letters, a non-UTF-8
file name on disk, an S3 key with an empty path component (``a//b.jpg``), a key ending in
``/`` that holds bytes, a key that is also a prefix, a dangling symbolic link.

Exit status: 0 when every check of every run passed, 1 otherwise (the JSON says which).

    python -m experiments.dirty_archive                       # the issue's kinds, ~20 real X-rays
    python -m experiments.dirty_archive --real 4 --runs local --out /tmp/dirty   # a quick try
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cxr.config import REPO_ROOT, SAMPLE_DATA

RUNS = ("local", "s3", "manifest")
RUN_TITLES = {"local": "local disk", "s3": "S3 prefix", "manifest": "S3 manifest (proxy)"}
BUCKET = "cxr-dirty"
OUT_BUCKET = "cxr-dirty-scores"
PREFIX = "archive"
FORBIDDEN = "bad/forbidden.jpg"
REAL_KIND = "real X-ray (shipped sample JPEG)"
GOOD = ("ok", "flagged")            # flagged: scored, with quality flags (an untrained tiny segmenter)


@dataclass
class Case:
    """One input kind: where it lives and what each run must make of it."""

    kind: str
    name: str                              # path under the archive root; a trailing "/" is a folder
    data: bytes | None                     # None: no bytes (a folder, a manifest-only URI, a link)
    expect: dict[str, str | None]          # run -> "ok" | "error" | None (not an input of that run)
    reason: str | None = None              # what an error row must say (checked where expected "error")
    exact: bool = False                    # reason is the whole error text
    on_disk: bool = True
    on_s3: bool = True
    uri_override: str | None = None        # a manifest-only URI (http://, gs://, a missing key)
    twice: bool = False                    # named twice in the manifest
    link_to: str | None = None             # a symbolic link on disk, to this target
    uris: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


def _everywhere(status: str | None, manifest: str | None = "same") -> dict[str, str | None]:
    return {"local": status, "s3": status, "manifest": status if manifest == "same" else manifest}


def real_images(n: int) -> list[Path]:
    """n real X-rays of the shipped sample, half kermany, half covid (as tests/test_scoring.py)."""
    kermany = sorted((SAMPLE_DATA / "kermany").rglob("*.jpg"))
    covid = sorted((SAMPLE_DATA / "covid").rglob("*.jpg"))
    return kermany[:n // 2] + covid[:n - n // 2]


def build_cases(n_real: int, max_file_mb: float, extra: bool) -> list[Case]:
    from cxr.data.decode import decode_image
    from cxr.data.errors import BadImageError
    from tests.inputs import BAD_INPUTS, COMPRESSED_NAMES, dicom_bytes, real_jpeg_bytes

    jpeg = real_jpeg_bytes()
    cases = [Case(REAL_KIND, "good/" + p.relative_to(SAMPLE_DATA).as_posix().replace("/", "-"), p.read_bytes(),
                  _everywhere("ok")) for p in real_images(n_real)]
    cases.append(Case("real DICOM (12-bit CR: rescale, window)", "good/xray.dcm", dicom_bytes(), _everywhere("ok")))
    for name in COMPRESSED_NAMES:
        cases.append(Case(f"real JPEG named *{Path(name).suffix}", f"good/{name}", jpeg, _everywhere("ok")))
    cases.append(Case("URI named twice in the manifest (real JPEG)", "good/twice.jpg", jpeg, _everywhere("ok"),
                      twice=True))
    for kind, (name, make) in BAD_INPUTS.items():
        data = make()
        try:
            decode_image(data, name)
            reason = None                  # the decoder accepts it: the check below will say so
        except BadImageError as e:
            reason = e.reason
        cases.append(Case(kind, f"bad/{name}", data, _everywhere("error"), reason, exact=reason is not None))
    cases.append(Case("zero-byte file (named .dcm)", "bad/zero.dcm", b"", _everywhere("error"),
                      "empty file (0 bytes)", exact=True))
    size = int(2 * max_file_mb * 2**20)
    cases.append(Case(f"file over --max-file-mb {max_file_mb:g} (a real JPEG padded to {size / 2**20:g} MiB)",
                      "bad/large.jpg", jpeg + b"\x00" * (size - len(jpeg)), _everywhere("error"),
                      "file too large"))
    cases.append(Case("S3 object the store refuses (403 in the proxied run; a real JPEG)", FORBIDDEN, jpeg,
                      {"local": "ok", "s3": "ok", "manifest": "error"}, "S3 403 Forbidden"))
    cases.append(Case("directory-looking key (empty folder on disk, `folder/` marker object on S3; "
                      "named in the manifest)", "bad/folder/", b"",
                      {"local": None, "s3": None, "manifest": "error"}, "not a regular file"))
    cases.append(Case("S3 object that does not exist (named in the manifest)", "bad/missing.jpg", None,
                      {"local": None, "s3": None, "manifest": "error"}, "file not found", on_disk=False,
                      on_s3=False))
    for kind, uri in (("http:// URI in the manifest", "http://pacs.example/archive/1.jpg"),
                      ("gs:// URI in the manifest", "gs://cxr-archive/2.png")):
        cases.append(Case(kind, uri, None, {"local": None, "s3": None, "manifest": "error"},
                          "unsupported URI scheme", on_disk=False, on_s3=False, uri_override=uri))
    if extra:
        cases += extra_cases(jpeg)
    return cases


def extra_cases(jpeg: bytes) -> list[Case]:
    """Names and keys rather than contents: what a real archive also holds."""
    s3_only = {"local": None, "s3": "ok", "manifest": "ok"}
    return [
        Case("[extra] file name with spaces, #, %, ? and non-ASCII letters", "good/sp ace #1 %20 ?q=1 é.jpg", jpeg,
             _everywhere("ok")),
        Case("[extra] non-UTF-8 file name on disk (latin-1 `caf\\xe9.jpg`)", "bad/" + os.fsdecode(b"caf\xe9.jpg"),
             jpeg, {"local": "error", "s3": None, "manifest": None}, "its name is not valid UTF-8", on_s3=False),
        Case("[extra] dangling symbolic link on disk", "bad/dangling.jpg", None,
             {"local": "error", "s3": None, "manifest": None}, "file not found", on_s3=False,
             link_to="/nonexistent/xray.jpg"),
        Case("[extra] S3 key with an empty path component (`a//b.jpg`)", "good/sub//double-slash.jpg", jpeg, s3_only,
             on_disk=False),
        Case("[extra] S3 key ending in `/` that holds bytes (a real JPEG)", "bad/slash-with-bytes/", jpeg,
             {"local": None, "s3": "error", "manifest": "error"}, "not a regular file", on_disk=False),
        Case("[extra] S3 key that is also a prefix: `both`", "good/both", jpeg, s3_only, on_disk=False),
        Case("[extra] S3 key that is also a prefix: `both/inner.jpg`", "good/both/inner.jpg", jpeg, s3_only,
             on_disk=False),
    ]


# --- the archive on disk and on S3 ------------------------------------------------------------

def write_local(cases: list[Case], root: Path) -> None:
    for c in cases:
        if not c.on_disk:
            continue
        path = root / c.name
        # As the listing names it: a name that is not UTF-8 with \\x escapes (cxr.data.storage).
        c.uris["local"] = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        if c.name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if c.link_to:
            os.symlink(c.link_to, path)
        else:
            path.write_bytes(c.data or b"")


def write_s3(cases: list[Case], stack) -> None:
    s3 = stack.s3_client()
    stack.create_bucket(BUCKET)
    stack.create_bucket(OUT_BUCKET)
    for c in cases:
        if c.uri_override:
            c.uris["manifest"] = c.uri_override
            continue
        uri = f"s3://{BUCKET}/{PREFIX}/{c.name}"
        c.uris["s3"] = c.uris["manifest"] = uri
        if c.on_s3:
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{c.name}", Body=c.data or b"")


def write_manifest(cases: list[Case], path: Path) -> list[str]:
    import pandas as pd

    uris = []
    for c in cases:
        if c.expect["manifest"] is not None:
            uris += [c.uris["manifest"]] * (2 if c.twice else 1)
    pd.DataFrame({"uri": uris}).to_parquet(path)
    return uris


# --- the runs ---------------------------------------------------------------------------------

def run_job(name: str, input_: str, output: str, models: dict[str, str], args, env: dict, logs: Path) -> dict:
    """``cxr score`` as its own process, as the CLI runs it; returns exit code, seconds, log tails."""
    cmd = [sys.executable, "-m", "jobs.cli", "score", "--input", input_, "--output", output,
           "--segmenter", models["segmenter"], "--classifier", models["classifier"], "--batch-size", "4",
           "--heatmap-size", "32", "--max-file-mb", f"{args.max_file_mb:g}", "--log-level", "WARNING"]
    out_log, err_log = logs / f"{name}.stdout", logs / f"{name}.stderr"
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        try:
            code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - started
    stdout = out_log.read_text(errors="replace")
    stderr = err_log.read_text(errors="replace")
    summary = next((line for line in stdout.splitlines() if line.startswith("score job ")), None)
    print(f"[{name}] exit {code} in {seconds:.1f} s: {summary or stderr.strip().splitlines()[-1:] or ''}",
          flush=True)
    record = {"command": " ".join(["cxr", *cmd[4:]]), "input": input_, "output": output, "exit_code": code,
              "seconds": round(seconds, 1), "summary": summary}
    if code != 0:
        record["stderr_tail"] = stderr[-6000:]
    return record


def read_rows(output: str, storage):
    from cxr.scores_table import read_scores

    try:
        return read_scores(output, storage, ["uri", "status", "error", "sha256"]).to_pandas()
    except Exception as e:  # noqa: BLE001 - a run that wrote nothing readable is a finding, not a crash here
        import pandas as pd

        print(f"cannot read the rows of {output}: {type(e).__name__}: {e}", file=sys.stderr)
        return pd.DataFrame({"uri": [], "status": [], "error": [], "sha256": []})


def check_run(run: str, cases: list[Case], rows, record: dict) -> dict[str, dict]:
    """Fills ``record`` with the run's checks; returns per case name what the run made of it."""
    counts = rows["uri"].value_counts()
    expected = {c.uris[run] for c in cases if c.expect[run] is not None}
    problems = []
    if record["exit_code"] != 0:
        problems.append(f"exit code {record['exit_code']}, not 0")
    doubled = {u: int(n) for u, n in counts.items() if n > 1}
    if doubled:
        problems.append(f"{len(doubled)} inputs with more than one row: {doubled}")
    missing, unexpected = sorted(expected - set(counts.index)), sorted(set(counts.index) - expected)
    if missing:
        problems.append(f"{len(missing)} inputs without a row: {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} rows for URIs that are not inputs: {unexpected}")
    by_uri = rows.drop_duplicates("uri", keep="first").set_index("uri")
    seen: dict[str, dict] = {}
    for c in cases:
        want = c.expect[run]
        uri = c.uris.get(run)
        n = int(counts.get(uri, 0)) if uri else 0
        got: dict = {"uri": uri, "rows": n}
        if want is None:
            got["status"] = "no row (not an input)" if n == 0 else f"{n} row(s), but not an input"
            if n:
                problems.append(f"{c.kind}: {uri} is not an input but has {n} row(s)")
        elif n == 0:
            got["status"] = "NO ROW"
        else:
            row = by_uri.loc[uri]
            got.update(status=row["status"], error=row["error"] if isinstance(row["error"], str) else None,
                       sha256_ok=(row["sha256"] == c.sha256) if isinstance(row["sha256"], str) else None)
            if n > 1:
                got["status"] = f"{n} ROWS ({row['status']})"
            if want == "ok" and row["status"] not in GOOD:
                problems.append(f"{c.kind}: {uri} is {row['status']} ({got['error']}), expected ok")
            if want == "ok" and row["sha256"] != c.sha256:
                problems.append(f"{c.kind}: {uri} has sha256 {row['sha256']}, expected {c.sha256}")
            if want == "error":
                if row["status"] != "error":
                    problems.append(f"{c.kind}: {uri} is {row['status']}, expected an error row")
                elif c.reason and not (got["error"] == c.reason if c.exact else c.reason in (got["error"] or "")):
                    problems.append(f"{c.kind}: {uri} says {got['error']!r}, expected "
                                    f"{'exactly' if c.exact else 'to contain'} {c.reason!r}")
                elif not c.reason:
                    problems.append(f"{c.kind}: the decoder accepts these bytes, so no reason was expected")
        seen[c.name if not c.uri_override else c.uri_override] = got
    record.update(inputs=len(expected), rows=int(len(rows)), uris_with_rows=int(len(counts)),
                  by_status={str(k): int(v) for k, v in rows["status"].value_counts().items()},
                  checks_passed=not problems, problems=problems)
    return seen


# --- the table --------------------------------------------------------------------------------

def cell(got: dict | None) -> str:
    if got is None:
        return "not run"
    status = got["status"]
    if status == "no row (not an input)":
        return "— (not an input)"
    return status + (" (sha256 ✓)" if got.get("sha256_ok") and status in GOOD else "")


def kind_table(cases: list[Case], results: dict[str, dict[str, dict]], runs: tuple[str, ...]) -> tuple[list, str]:
    """Per kind: the file and what each run made of it (real X-rays folded into one line)."""
    kinds, lines = [], []
    header = ["kind", "file", *(RUN_TITLES[r] for r in RUNS), "error text"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    real = [c for c in cases if c.kind == REAL_KIND]
    if real:
        per_run = {}
        for r in RUNS:
            if r not in runs:
                per_run[r] = "not run"
                continue
            gots = [results[r][c.name] for c in real]
            statuses: dict[str, int] = {}
            for g in gots:
                statuses[g["status"]] = statuses.get(g["status"], 0) + 1
            sha = all(g.get("sha256_ok") for g in gots)
            per_run[r] = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + (" (sha256 ✓)" if sha else "")
        kinds.append({"kind": f"{REAL_KIND} x{len(real)}", "file": "good/kermany-*.jpg, good/covid-*.jpg",
                      "expect": real[0].expect, **per_run, "error": None})
        lines.append(f"| {REAL_KIND} x{len(real)} | `good/kermany-…jpg`, `good/covid-…jpg` | "
                     + " | ".join(per_run[r] for r in RUNS) + " | |")
    for c in cases:
        if c.kind == REAL_KIND:
            continue
        key = c.name if not c.uri_override else c.uri_override
        gots = {r: results[r].get(key) if r in runs else None for r in RUNS}
        errors = {r: g.get("error") for r, g in gots.items() if g and g.get("error")}
        distinct = list(dict.fromkeys(errors.values()))
        if len(distinct) > 1:
            text = "; ".join(f"{RUN_TITLES[r]}: {e}" for r, e in errors.items())
        else:
            text = distinct[0] if distinct else ""
        shown = c.name if not c.uri_override else c.uri_override
        kinds.append({"kind": c.kind, "file": shown, "expect": c.expect, "expected_reason": c.reason,
                      **{r: gots[r] for r in RUNS}, "error": text or None})
        esc = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
        lines.append(f"| {esc(c.kind)} | `{esc(ascii(shown)[1:-1] if not shown.isprintable() else shown)}` | "
                     + " | ".join(cell(gots[r]) for r in RUNS) + f" | {('`' + esc(text) + '`') if text else ''} |")
    return kinds, "\n".join(lines)


def markdown(report: dict, table: str) -> str:
    head = ["# Dirty archive (issue 13)", "",
            f"Command: `{report['command']}`. Machine: {report['machine']}. Date: {report['date']}. "
            f"Wall time {report['seconds']:.0f} s (stack start, model registration and "
            f"{len(report['runs'])} run(s)).", "",
            "Each run is `cxr score` in its own process (Ray started by the job). Good inputs must be `ok` "
            "(or `flagged`: scored, with quality flags; the segmenter is untrained) with the sha256 of their "
            "bytes; each bad kind one `error` row with its reason; every input exactly one row; exit code 0.", "",
            "| run | input | inputs | rows | exit code | seconds | by status | checks |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        status = ", ".join(f"{k} {v}" for k, v in sorted(r.get("by_status", {}).items()))
        head.append(f"| {RUN_TITLES[name]} | `{r['input']}` | {r.get('inputs')} | {r.get('rows')} | {r['exit_code']} | "
                    f"{r['seconds']} | {status} | {'pass' if r.get('checks_passed') else 'FAIL'} |")
    head.append("")
    problems = [f"- {RUN_TITLES[n]}: {p}" for n, r in report["runs"].items() for p in r.get("problems", [])]
    if problems:
        head += ["Failed checks:", "", *problems, ""]
    return "\n".join(head + [table, ""])


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dirty_archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=20, help="real X-rays of the shipped sample (default: 20)")
    parser.add_argument("--max-file-mb", type=float, default=1.0,
                        help="cxr score --max-file-mb; the oversized file is twice this (default: 1)")
    parser.add_argument("--fail-every", type=int, default=0,
                        help="the proxy of the manifest run also answers 503 SlowDown to every Nth request "
                             "(default: 0, none: the run checks the 403 alone; 3: as tests/test_scoring.py)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which runs, comma-separated (default: {','.join(RUNS)})")
    parser.add_argument("--extra", action="store_true", help="add the edge cases of names and keys (see above)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "results"),
                        help="folder for dirty_archive.json and dirty_archive.md (default: docs/results)")
    parser.add_argument("--machine", default="dev: 2 cores, no GPU", help="the machine, for the record")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per run (default: 1200)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (archive, logs, scores)")
    args = parser.parse_args(argv)
    runs = tuple(r for r in RUNS if r in args.runs.split(","))

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from cxr.data.storage import StorageConfig
    from infra.local.stack import LocalStack
    from tests.flaky_proxy import FlakyProxy
    from tests.models import register_classifier, register_segmenter, unique

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-dirty-")).resolve()
    logs = tmp / "logs"
    logs.mkdir()
    cases = build_cases(args.real, args.max_file_mb, args.extra)
    write_local(cases, tmp / "archive")
    stack = LocalStack(tmp / "stack").start()
    report: dict = {}
    try:
        with stack.exported():        # jobs read the endpoints from the environment
            write_s3(cases, stack)
            manifest = tmp / "manifest.parquet"
            manifest_uris = write_manifest(cases, manifest)
            print(f"archive: {sum(c.on_disk and c.data is not None for c in cases)} files in {tmp / 'archive'}, "
                  f"{sum(c.on_s3 for c in cases)} objects in s3://{BUCKET}/{PREFIX}, "
                  f"{len(manifest_uris)} URIs in the manifest", flush=True)
            segmenter = register_segmenter(stack.tracking_uri, unique("dirty-segmenter"))
            models = {"segmenter": segmenter,
                      "classifier": register_classifier(stack.tracking_uri, unique("dirty-classifier"), segmenter)}
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
            direct = StorageConfig(s3_endpoint=stack.s3_endpoint, max_attempts=3)
            records, results = {}, {}
            for run in runs:
                if run == "local":
                    records[run] = run_job(run, str(tmp / "archive"), str(tmp / "scores-local"), models, args, env,
                                           logs)
                elif run == "s3":
                    records[run] = run_job(run, f"s3://{BUCKET}/{PREFIX}", f"s3://{OUT_BUCKET}/s3", models, args, env,
                                           logs)
                else:
                    with FlakyProxy(stack.s3_endpoint, fail_every=args.fail_every or 10**9,
                                    forbidden={f"{BUCKET}/{PREFIX}/{FORBIDDEN}"}) as proxy:
                        # Scores written to S3 through the proxy too: its 503s hit the writes and the lease.
                        records[run] = run_job(run, str(manifest), f"s3://{OUT_BUCKET}/manifest", models, args,
                                               {**env, "CXR_S3_ENDPOINT": proxy.endpoint}, logs)
                        records[run].update(proxy_503s=proxy.failed, proxy_requests=len(proxy.requests),
                                            manifest_uris=len(manifest_uris))
                output = records[run]["output"]
                rows = read_rows(output, direct if output.startswith("s3://") else None)
                results[run] = check_run(run, cases, rows, records[run])
            kinds, table = kind_table(cases, results, runs)
            report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": args.machine,
                      "command": " ".join(["python -m experiments.dirty_archive",
                                           *(argv if argv is not None else sys.argv[1:])]),
                      "max_file_mb": args.max_file_mb, "real_images": args.real, "extra": args.extra,
                      "models": models, "seconds": round(time.perf_counter() - started, 1), "runs": records,
                      "kinds": kinds}
    finally:
        stack.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dirty_archive.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report, table)
    (out / "dirty_archive.md").write_text(text)
    print(text)
    passed = all(r.get("checks_passed") for r in report["runs"].values())
    print(f"{'all checks passed' if passed else 'CHECKS FAILED'}; wrote {out / 'dirty_archive.json'} and "
          f"{out / 'dirty_archive.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
