"""Byte I/O over ``pyarrow.fs`` for local paths and ``s3://`` URIs.

The same functions read real S3, MinIO or the loopback test server: only the endpoint in
:class:`StorageConfig` changes. Credentials come from the environment (AWS SDK default chain),
never from config files.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from cxr.data.errors import BadImageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageConfig:
    """Where ``s3://`` URIs go. ``s3_endpoint=None`` means AWS itself."""

    s3_endpoint: str | None = None
    region: str = "us-east-1"
    # pyarrow's AWS standard retry strategy (exponential backoff) for transient errors.
    max_attempts: int = 6
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict = dict(
        region=cfg.region,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
        connect_timeout=cfg.connect_timeout_s,
        request_timeout=cfg.request_timeout_s,
    )
    if cfg.s3_endpoint:
        parsed = urlparse(cfg.s3_endpoint if "://" in cfg.s3_endpoint else f"http://{cfg.s3_endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
        # Custom endpoints (MinIO, moto) address buckets by path, not by virtual host.
        kwargs.update(force_virtual_addressing=False)
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def s3_client(cfg: StorageConfig):
    """A boto3 client for what pyarrow's filesystem cannot do: conditional writes (leases) and
    listings with ETags. Same endpoint, region and retries as the filesystem."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=cfg.s3_endpoint, region_name=cfg.region,
                        config=Config(retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                                      connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.request_timeout_s))


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        return _s3_filesystem(cfg or StorageConfig()), uri[len("s3://"):]
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/key")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (Ray workers run in other folders); other URIs unchanged."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def read_bytes(uri: str, cfg: StorageConfig | None = None, max_bytes: int | None = None) -> bytes:
    """Read a whole object. Raises :class:`BadImageError` if it is missing or too large.

    Transient S3 errors are retried inside pyarrow (``max_attempts``); an ``OSError`` that
    still escapes is an infrastructure failure and is left to the caller.
    """
    fs, path = filesystem_for(uri, cfg)
    try:
        info = fs.get_file_info(path)
    except pa.ArrowInvalid:
        if not is_s3(uri):
            raise
        return _read_s3_object(uri, cfg or StorageConfig(), max_bytes)   # a key pyarrow cannot address
    if info.type == pafs.FileType.NotFound:
        if not is_s3(uri) and "\\x" in uri:
            raise BadImageError(uri, "file not found: its name is not valid UTF-8, so it is listed with \\x "
                                     "escapes and cannot be opened by that name; rename the file")
        raise BadImageError(uri, "file not found")
    if info.type != pafs.FileType.File:
        raise BadImageError(uri, "not a regular file")
    if max_bytes is not None and info.size is not None and info.size > max_bytes:
        raise BadImageError(uri, f"file too large: {info.size:,} bytes > limit {max_bytes:,}")
    # compression=None: bytes are read as bytes. pyarrow would otherwise decompress a file
    # named *.gz / .bz2 / .lz4 / .zst transparently, past the size limit.
    with fs.open_input_stream(path, compression=None) as stream:
        data = stream.read(max_bytes + 1) if max_bytes is not None else stream.read()
    if max_bytes is not None and len(data) > max_bytes:     # the listing's size was stale or missing
        raise BadImageError(uri, f"file too large: more than the limit of {max_bytes:,} bytes")
    return data


# What a listing gives for free about an input: its identity for "is this new work?" is (uri,
# size, mtime); the ETag and the version id (an S3 Inventory's) are kept for lineage.
def _read_s3_object(uri: str, cfg: StorageConfig, max_bytes: int | None) -> bytes:
    """Read through boto3 an S3 key that pyarrow refuses as a path (``a//b.jpg``: S3 keys may
    hold empty path components; pyarrow's filesystem paths may not)."""
    bucket, key = uri[len("s3://"):].split("/", 1)
    client = s3_client(cfg)
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if max_bytes is not None and size > max_bytes:
            raise BadImageError(uri, f"file too large: {size:,} bytes > limit {max_bytes:,}")
        ranged = {"Range": f"bytes=0-{max_bytes}"} if max_bytes is not None and size else {}
        return client.get_object(Bucket=bucket, Key=key, **ranged)["Body"].read()
    except client.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise BadImageError(uri, "file not found") from e
        if code in ("403", "AccessDenied"):
            raise OSError(f"ACCESS_DENIED: {e}") from e
        raise OSError(str(e)) from e


ENTRY_SCHEMA = pa.schema([("uri", pa.string()), ("source_size", pa.int64()), ("source_mtime_ns", pa.int64()),
                          ("source_etag", pa.string()), ("source_version_id", pa.string())])
MISSING_SIZE = -1        # what a listing records for an object that is not there


def list_entries(prefix: str, cfg: StorageConfig | None = None, page_rows: int = 10_000) -> pa.Table:
    """Every regular file under a folder or ``s3://`` prefix with what the listing gives for
    free (``ENTRY_SCHEMA``): sorted, hidden files skipped. No object is opened."""
    return pa.Table.from_batches(list(entry_batches(prefix, cfg, page_rows)), schema=ENTRY_SCHEMA).sort_by("uri")


def entry_batches(prefix: str, cfg: StorageConfig | None = None, page_rows: int = 10_000) -> Iterator[pa.RecordBatch]:
    """``list_entries`` as it is read, in listing order, ``page_rows`` at a time: the listing is
    read page by page into Arrow (1,000 keys per S3 page), never as one list of Python objects,
    and a consumer that streams (``cxr.new_work``) never holds it whole."""
    fs, path = filesystem_for(prefix, cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield from _entries(fs, [info]).to_batches()
        return
    if info.type == pafs.FileType.NotFound and not is_s3(prefix):
        raise FileNotFoundError(f"input not found: {prefix}")
    pages = _s3_pages(path, cfg or StorageConfig()) if is_s3(prefix) else _local_pages(path)
    rows = {name: [] for name in ENTRY_SCHEMA.names}
    for entry in pages:
        for name, value in zip(ENTRY_SCHEMA.names, entry):
            rows[name].append(value)
        if len(rows["uri"]) >= page_rows:
            yield pa.RecordBatch.from_pydict(rows, schema=ENTRY_SCHEMA)
            rows = {name: [] for name in ENTRY_SCHEMA.names}
    yield pa.RecordBatch.from_pydict(rows, schema=ENTRY_SCHEMA)


def _local_pages(root: str):
    """(path, size, mtime_ns, None, None) per file. A link that leads nowhere, or a file gone
    since the walk saw it, is listed with size -1: scoring makes "file not found" its row. A
    name that is not valid UTF-8 is listed with \\x escapes (Arrow strings are UTF-8), which
    also reads as "file not found", with the reason.

    Folders linked into the input (the way an archive is often mounted) are followed. A folder
    that is also inside the input as itself is listed there, by its own path (so a link such as
    ``latest -> 2024-05`` never takes over the real folder's URIs); a link back to a folder the
    walk is inside (a loop), or a second link to one already listed, is not followed, with a
    warning naming both: every file is listed once, and nothing is left out in silence."""
    seen = _real_folders(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".") and _first_visit(os.path.join(folder, d), folder, seen)]
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                continue             # a socket, a fifo, a device: not a file to read
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                path, st = os.fsencode(path).decode("utf-8", "backslashreplace"), None
            yield (path, MISSING_SIZE, 0, None, None) if st is None else (path, st.st_size, st.st_mtime_ns, None, None)


def _s3_pages(path: str, cfg: StorageConfig):
    """(uri, size, mtime_ns, etag, None) per object, from ListObjectsV2 page by page (boto3:
    pyarrow's listing returns the whole list at once, without ETags)."""
    bucket, _, key = path.partition("/")
    client = s3_client(cfg)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if (name.endswith("/") and not obj["Size"]) or os.path.basename(name.rstrip("/")).startswith("."):
                    continue         # folder markers, hidden files (a "folder/" key with bytes is an input)
                yield (f"s3://{bucket}/{name}", obj["Size"], int(obj["LastModified"].timestamp()) * 1_000_000_000,
                       obj.get("ETag", "").strip('"') or None, None)
    except client.exceptions.NoSuchBucket as e:
        raise FileNotFoundError(f"S3 bucket {bucket} not found") from e


INVENTORY_COLUMNS = {"bucket", "key"}


def inventory_entries(uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """``ENTRY_SCHEMA`` rows from an S3 Inventory report (Parquet, or CSV with a header and
    URL-encoded keys, as S3 writes them) with the
    inventory's column names: ``bucket``, ``key``, ``size``, ``last_modified_date``, ``e_tag``,
    ``version_id``, and ``is_latest`` / ``is_delete_marker`` where versions are listed. Only
    those columns are read, and no object is asked for anything: the inventory is the listing.
    Delete markers and non-current versions are left out; so are folder markers."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri, cfg)
    wanted = ["bucket", "key", "size", "last_modified_date", "e_tag", "version_id", "is_latest", "is_delete_marker"]
    if path.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}))
        table = table.select([c for c in wanted if c in table.column_names])
        # S3 Inventory writes keys URL-encoded in its CSV files (not in Parquet or ORC).
        keys = [unquote_plus(k) if k is not None else None for k in table["key"].to_pylist()]
        table = table.set_column(table.column_names.index("key"), "key", pa.array(keys, pa.string()))
    else:
        names = pq.read_schema(fs.open_input_file(path)).names
        table = pq.read_table(path, filesystem=fs, columns=[c for c in wanted if c in names])
    for flag, keep in (("is_delete_marker", False), ("is_latest", True)):
        if flag in table.column_names:
            table = table.filter(pc.equal(pc.fill_null(table[flag].cast(pa.bool_()), not keep), keep))
    table = table.filter(pc.invert(pc.ends_with(table["key"], "/")))
    uris = pc.binary_join_element_wise("s3://", pc.binary_join_element_wise(table["bucket"], table["key"], "/"), "")
    n = table.num_rows

    def column(name: str, kind: pa.DataType, default) -> pa.Array:
        return table[name].cast(kind) if name in table.column_names else pa.array([default] * n, kind)

    # Whole seconds, as a listing or a HEAD reports an S3 object's time: the same object listed
    # either way has the same identity.
    seconds = pc.divide(column("last_modified_date", pa.timestamp("ms", tz="UTC"), None).cast(pa.int64()), 1000)
    return pa.Table.from_arrays([
        uris, pc.fill_null(column("size", pa.int64(), MISSING_SIZE), MISSING_SIZE),
        pc.fill_null(pc.multiply(seconds, 1_000_000_000), 0),
        column("e_tag", pa.string(), None), column("version_id", pa.string(), None),
    ], schema=ENTRY_SCHEMA)


def stat_entries(uris: list[str], cfg: StorageConfig | None = None, chunk: int = 1000) -> pa.Table:
    """``ENTRY_SCHEMA`` rows for the URIs of a manifest, in order, from metadata only (one
    HEAD per S3 object, batched by pyarrow). A URI that is not there, that the store refuses
    to describe, or whose scheme the storage layer cannot read gets size -1 and time 0: scoring
    then reads it and makes the real reason its error row. No one URI fails the listing."""
    sizes: list[int] = [MISSING_SIZE] * len(uris)
    mtimes: list[int] = [0] * len(uris)
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, uri in enumerate(uris):
        try:
            filesystem_for(uri, cfg)
        except ValueError:            # an unsupported scheme: stays -1 / 0
            continue
        groups[is_s3(uri)].append(i)
    for s3, indices in groups.items():
        if not indices:
            continue
        fs, _ = filesystem_for(uris[indices[0]], cfg)
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            try:
                infos = fs.get_file_info([filesystem_for(uris[j], cfg)[1] for j in part])
            except (OSError, pa.ArrowInvalid):   # one path the store will not describe fails the whole call
                infos = [_info_or_none(fs, filesystem_for(uris[j], cfg)[1]) for j in part]
            for i, info in zip(part, infos):
                if info is not None and info.type == pafs.FileType.File:
                    sizes[i], mtimes[i] = info.size, info.mtime_ns or 0
    return pa.Table.from_pydict({"uri": uris, "source_size": sizes, "source_mtime_ns": mtimes,
                                 "source_etag": [None] * len(uris), "source_version_id": [None] * len(uris)},
                                schema=ENTRY_SCHEMA)


def _info_or_none(fs: pafs.FileSystem, path: str) -> pafs.FileInfo | None:
    try:
        return fs.get_file_info(path)
    except (OSError, pa.ArrowInvalid):   # refused, or a key pyarrow cannot address (a//b)
        return None


def _entries(fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> pa.Table:
    return pa.Table.from_pydict({"uri": [to_uri(fs, i.path) for i in infos], "source_size": [i.size for i in infos],
                                 "source_mtime_ns": [i.mtime_ns or 0 for i in infos],
                                 "source_etag": [None] * len(infos), "source_version_id": [None] * len(infos)},
                                schema=ENTRY_SCHEMA)


def _real_folders(root: str) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every folder under ``root`` reached without following a link
    (a walk of folders only: no file is looked at)."""
    found = {}
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        try:
            st = os.stat(folder)
        except OSError:
            continue
        found.setdefault((st.st_dev, st.st_ino), folder)
    return found


def _first_visit(path: str, parent: str, seen: dict[tuple[int, int], str]) -> bool:
    """Whether the walk should enter the folder ``path``: a real folder, yes (it is its own
    entry in ``seen``); a link, only to a folder neither under the input nor already entered
    (refused with a warning: a loop when that folder holds ``parent``)."""
    try:
        st = os.stat(path)
    except OSError:
        return True                       # os.walk reports what it cannot enter itself
    first = seen.get((st.st_dev, st.st_ino))
    if first is None:
        seen[(st.st_dev, st.st_ino)] = path
        return True
    if first == path:
        return True
    real_parent, real_first = os.path.realpath(parent), os.path.realpath(first)
    if real_parent == real_first or real_parent.startswith(real_first.rstrip(os.sep) + os.sep):
        log.warning("%s is a link back to %s, which holds it (a loop): not followed", path, first)
    else:
        log.warning("%s leads to the folder already listed as %s: its files are listed once, there", path, first)
    return False


def list_files(prefix: str, cfg: StorageConfig | None = None) -> list[str]:
    """All regular files under a folder or ``s3://`` prefix, sorted, hidden files skipped."""
    return list_entries(prefix, cfg).column("uri").to_pylist()


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem_for(uri, cfg)
    parent = os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
