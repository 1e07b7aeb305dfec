"""Parquet manifests: one row per image with uri, sha256, label, patient and split.

Builders for the three curated sets (kermany, covid, lungseg; layouts in the data README), for
a generic labeled CSV, and for an unlabeled folder or ``s3://`` prefix (for scoring).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr.data.errors import BadImageError
from cxr.data.storage import StorageConfig, filesystem_for, list_files, read_bytes

# 2: ``archive`` (the hospital or collection an image comes from, for leave-one-archive-out).
SCHEMA_VERSION = "2"

SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),             # null when the file could not be read
    pa.field("label", pa.string()),              # null when unknown (scoring input)
    pa.field("patient_id", pa.string()),         # namespaced by dataset: "covid:42"
    pa.field("source", pa.string()),             # kermany/train, kermany/test, covid, montgomery, shenzhen, ...
    pa.field("archive", pa.string()),            # kermany, covid/hannover, ..., montgomery, jsrt, tbx11k (ARCHIVES)
    pa.field("view", pa.string()),
    pa.field("age_group", pa.string()),          # adult, pediatric, unknown
    pa.field("split", pa.string()),              # train, val, test, or null
    pa.field("finding", pa.string()),            # the source dataset's own label text
    pa.field("near_duplicate_group", pa.string()),
    pa.field("mask_uri", pa.string()),           # lung mask (lungseg only)
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])

KERMANY_LABELS = {"NORMAL": "normal", "BACTERIA": "bacterial", "VIRUS": "viral"}

# Where the COVID collection's images were published, from the host of their ``url``: each is
# a different set of hospitals, scanners and post-processing, so each is one archive for
# leave-one-archive-out. Hannover's are a hospital's own export (ml-workgroup repository on
# GitHub); the journals and case sites below the big four are pooled as "literature".
COVID_ORIGINS = {"github.com": "hannover", "radiopaedia.org": "radiopaedia", "eurorad.org": "eurorad",
                 "sirm.org": "sirm"}


def covid_archive(url: str | None) -> str:
    """``covid/<origin>`` of a COVID-collection image from its source url (``covid/literature``
    for journals and other case sites, and for no url)."""
    text = url if isinstance(url, str) else ""
    host = (urlparse(text if "//" in text else f"//{text}").hostname or "").lower()
    origin = next((name for site, name in COVID_ORIGINS.items() if host == site or host.endswith("." + site)),
                  "literature")
    return f"covid/{origin}"


def _blank_to_none(series: pd.Series) -> pd.Series:
    s = series.astype("string").str.strip()
    return s.where(s.notna() & (s != ""), None).astype(object)


def _age_group(age: str | None) -> str:
    try:
        return "adult" if float(age) >= 18 else "pediatric"
    except (TypeError, ValueError):
        return "unknown"


def kermany_manifest(root: Path) -> pd.DataFrame:
    """Kermany pediatric pneumonia: 3 classes, its own train/test folders kept as ``source``."""
    meta = pd.read_csv(root / "kermany" / "labels.csv", dtype=str)
    return pd.DataFrame({
        "uri": [str((root / "kermany" / f).resolve()) for f in meta["filename"]],
        "label": meta["label"].map(KERMANY_LABELS),
        "patient_id": "kermany:" + meta["patient_id"],
        "source": "kermany/" + meta["split"],
        "archive": "kermany",
        "view": "AP",                 # Kermany et al.: anterior-posterior films of children aged 1-5
        "age_group": "pediatric",
        "finding": meta["label"],
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def covid_manifest(root: Path) -> pd.DataFrame:
    """ieee8023 COVID-19 image collection, all findings; ``label`` is set by the task builders."""
    meta = pd.read_csv(root / "covid" / "metadata.csv", dtype=str, keep_default_na=False)
    return pd.DataFrame({
        "uri": [str((root / "covid" / f).resolve()) for f in meta["filename"]],
        "label": None,
        "patient_id": "covid:" + meta["patientid"],
        "source": "covid",
        "archive": [covid_archive(u) for u in meta["url"]],
        "view": meta["view"],
        "age_group": [_age_group(a) for a in meta["age"]],
        "finding": meta["finding"],
        "near_duplicate_group": _blank_to_none(meta["near_duplicate_group"]),
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def lungseg_manifest(root: Path) -> pd.DataFrame:
    """Montgomery + Shenzhen image/mask pairs. One image per patient; ``_0``/``_1`` is TB status."""
    meta = pd.read_csv(root / "lungseg" / "pairs.csv", dtype=str)
    return pd.DataFrame({
        "uri": [str((root / "lungseg" / f).resolve()) for f in meta["image"]],
        "label": None,
        "patient_id": "lungseg:" + meta["stem"].str.rsplit("_", n=1).str[0],
        "source": meta["source"].str.lower(),
        "archive": meta["source"].str.lower(),
        "view": "PA",
        # The curated pairs.csv has no age; both sets are overwhelmingly adult screening films.
        "age_group": "adult",
        "finding": meta["tb_label"].map({"0": "normal", "1": "tuberculosis"}),
        "mask_uri": [str((root / "lungseg" / f).resolve()) for f in meta["mask"]],
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def jsrt_manifest(root: Path) -> pd.DataFrame:
    """JSRT (Japan, digitised film) with SCR lung masks, ``external/jsrt``: an archive no cxr
    model trains on, for the segmenter's cross-archive Dice. One film per patient, all adults."""
    meta = pd.read_csv(root / "external" / "jsrt" / "pairs.csv", dtype=str)
    folder = root / "external" / "jsrt"
    return pd.DataFrame({
        "uri": [str((folder / f).resolve()) for f in meta["image"]],
        "label": None,
        "patient_id": "jsrt:" + meta["stem"],
        "source": "jsrt",
        "archive": "jsrt",
        "view": meta["view"],
        "age_group": "adult",
        "split": "test",
        "finding": meta["finding"],
        "mask_uri": [str((folder / f).resolve()) for f in meta["mask"]],
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def tbx11k_manifest(root: Path) -> pd.DataFrame:
    """TBX11K (China), ``external/tbx11k``: 800 adult films, all with tuberculosis. No patient
    ids upstream, so each image is its own patient."""
    meta = pd.read_csv(root / "external" / "tbx11k" / "labels.csv", dtype=str, keep_default_na=False)
    folder = root / "external" / "tbx11k"
    return pd.DataFrame({
        "uri": [str((folder / f).resolve()) for f in meta["image"]],
        "label": None,
        "patient_id": "tbx11k:" + meta["stem"],
        "source": "tbx11k",
        "archive": "tbx11k",
        "view": "PA",
        "age_group": "adult",
        "finding": "tuberculosis",
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def views_manifest(root: Path) -> pd.DataFrame:
    """Lateral chest films and CT slices from the COVID collection, ``external/views``, as plain
    JPEGs with no tags: what quality control learns the ``lateral`` and CT flags from. Their
    ``patient_id`` is the collection's own (``covid:`` as in ``covid_manifest``), so a patient's
    frontal and lateral films are one leakage group. ``view`` is ``lateral`` or ``ct``."""
    meta = pd.read_csv(root / "external" / "views" / "labels.csv", dtype=str, keep_default_na=False)
    folder = root / "external" / "views"
    return pd.DataFrame({
        "uri": [str((folder / f).resolve()) for f in meta["filename"]],
        "label": None,
        "patient_id": "covid:" + meta["patientid"],
        "source": "views",
        "archive": "views",
        "view": meta["kind"],
        "age_group": [_age_group(a) for a in meta["age"]],
        "finding": meta["finding"],
        "width": meta["width"].astype(int),
        "height": meta["height"].astype(int),
    })


def csv_manifest(csv_uri: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """A user's labeled CSV with columns ``path,label,patient_id[,source]``.

    Relative paths are taken relative to the CSV's folder (or S3 prefix).
    """
    import io

    table = pd.read_csv(io.BytesIO(read_bytes(csv_uri, storage)), dtype=str, keep_default_na=False)
    missing = {"path", "label", "patient_id"} - set(table.columns)
    if missing:
        raise ValueError(f"{csv_uri}: missing column(s) {sorted(missing)}; expected path,label,patient_id[,source]")
    base = csv_uri.rsplit("/", 1)[0] if "/" in csv_uri else "."

    def resolve(p: str) -> str:
        if p.startswith("s3://") or p.startswith("/"):
            return p
        return f"{base}/{p}" if base.startswith("s3://") else str((Path(base) / p).resolve())

    return pd.DataFrame({
        "uri": [resolve(p) for p in table["path"]],
        "label": _blank_to_none(table["label"]),
        "patient_id": _blank_to_none(table["patient_id"]),
        "source": table["source"] if "source" in table.columns else "csv",
    })


def folder_manifest(prefix: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """Every file under a folder or ``s3://`` prefix, unlabeled: the input of a scoring run."""
    uris = list_files(prefix, storage)
    return pd.DataFrame({"uri": uris, "source": prefix.rstrip("/")})


def sha256_of(uri: str, storage: StorageConfig | None = None, max_bytes: int | None = None) -> str | None:
    """sha256 of the file's bytes; None if it cannot be read as an input (the row is kept)."""
    try:
        return hashlib.sha256(read_bytes(uri, storage, max_bytes)).hexdigest()
    except BadImageError:
        return None


def add_sha256(df: pd.DataFrame, storage: StorageConfig | None = None, threads: int = 16) -> pd.DataFrame:
    # I/O bound (and hashlib releases the GIL), so threads overlap object-store latency.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(lambda u: sha256_of(u, storage), df["uri"]))
    return df.assign(sha256=digests)


def to_table(df: pd.DataFrame, metadata: dict | None = None) -> pa.Table:
    """Conform a frame to :data:`SCHEMA` (missing columns become nulls)."""
    full = df.reindex(columns=SCHEMA.names)
    full = full.astype(object).where(full.notna(), None)
    table = pa.Table.from_pandas(full, schema=SCHEMA, preserve_index=False)
    meta = {b"cxr.manifest_schema": SCHEMA_VERSION.encode(), b"cxr.digest": manifest_digest(df).encode()}
    for k, v in (metadata or {}).items():
        meta[f"cxr.{k}".encode()] = json.dumps(v).encode()
    return table.replace_schema_metadata(meta)


def manifest_digest(df: pd.DataFrame) -> str:
    """A content hash of a manifest that ignores where the files live: sha256, label, split."""
    cols = [c for c in ("sha256", "label", "split") if c in df.columns]
    lines = sorted("|".join("" if v is None or v != v else str(v) for v in row)
                   for row in df[cols].itertuples(index=False))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_manifest(df: pd.DataFrame, uri: str, storage: StorageConfig | None = None,
                   metadata: dict | None = None) -> str:
    """Write a manifest Parquet file and return its digest."""
    fs, path = filesystem_for(uri, storage)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    table = to_table(df, metadata)
    pq.write_table(table, path, filesystem=fs)
    return table.schema.metadata[b"cxr.digest"].decode()


def read_manifest(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """A manifest as a DataFrame; with ``columns``, only those are read (Parquet is columnar)."""
    fs, path = filesystem_for(uri, storage)
    return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()
