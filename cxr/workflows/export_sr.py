"""``cxr export-sr``: a night's results (or one job's) for the PACS and for people: a DICOM SR
per scored DICOM study (``cxr.dicom_sr``) and a CSV worklist of its screen-positives.

Each source file is read again for its header and must be the file that was scored (same
bytes, same UIDs). A study that fails that, or whose report cannot be built, is listed in
``errors.csv`` with the reason; the other studies are still written."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd

from cxr.data.dicom_header import IDENTITY_COLUMNS, read_header
from cxr.data.storage import StorageConfig, read_bytes
from cxr.dicom_sr import read_back, study_report
from cxr.scores_table import SCORED_STATUSES, rows_for

log = logging.getLogger(__name__)

WORKLIST_COLUMNS = ["study_instance_uid", "accession_number", "patient_id", "study_date", "series_instance_uid",
                    "sop_instance_uid", "uri", "covid_probability", "covid_threshold", "predicted_label", "status",
                    "qc_flags", "classifier_name", "classifier_version", "job_id"]
READ_LIMIT = 256 * 2**20      # bytes read again for a header (the header is at the front; the read is bounded)


def job_rows(scores: str, job: str | None, storage: StorageConfig | None) -> pd.DataFrame:
    """The rows the export covers (``cxr.scores_table.rows_for``: by default the latest night)."""
    columns = ["uri", "sha256", "status", "predicted_label", "covid_probability", "covid_threshold", "screen_positive",
               "qc_flags", "classifier_name", "classifier_version", "job_id", "scored_at", *IDENTITY_COLUMNS]
    return rows_for(scores, job, storage, columns).to_pandas()


def source_header(uri: str, sha256: str, study: str, sop: str, storage: StorageConfig | None):
    """The header of the file a row scored, read again: refused (ValueError) where the file has
    changed since (other bytes, or other UIDs), so a result never files under another image."""
    data = read_bytes(uri, storage, READ_LIMIT)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{uri} has changed since it was scored (its bytes differ); score it again")
    header = read_header(data, uri)
    if header is None:
        raise ValueError(f"{uri} is no longer a readable DICOM")
    if (str(header.get("StudyInstanceUID", "")), str(header.get("SOPInstanceUID", ""))) != (study, sop):
        raise ValueError(f"{uri}'s UIDs differ from its scored row's")
    return header


def worklist(rows: pd.DataFrame) -> pd.DataFrame:
    """The screen-positives, most probable first, with what finds them in the RIS and PACS."""
    positives = rows[rows["screen_positive"].fillna(False).astype(bool)]
    out = positives.sort_values("covid_probability", ascending=False)[WORKLIST_COLUMNS].copy()
    out["qc_flags"] = out["qc_flags"].map(lambda flags: ";".join(flags) if flags is not None else "")
    return out


def algorithms(rows: pd.DataFrame, tracking_uri: str | None) -> dict:
    """(classifier name, version) -> the SR's algorithm identification: cxr's version, the
    weights' sha256 (the registry's ``cxr.weights_sha256`` tag) and the threshold it ran at."""
    from cxr.dicom_sr import algorithm
    from cxr.tracking import client, cxr_version

    out = {}
    for (name, version), group in rows.groupby(["classifier_name", "classifier_version"]):
        digest = None
        if tracking_uri:
            try:
                digest = client(tracking_uri).get_model_version(str(name), str(version)).tags.get("cxr.weights_sha256")
            except Exception as e:  # noqa: BLE001 - the report still names the registry entry
                log.warning("no weights digest of %s v%s: %s", name, version, str(e).splitlines()[0] if str(e) else e)
        thresholds = group["covid_threshold"].dropna().unique() if "covid_threshold" in group else []
        out[(str(name), str(version))] = algorithm(str(name), str(version), digest,
                                                   float(thresholds[0]) if len(thresholds) == 1 else None, cxr_version())
    return out


def export_sr(scores: str, job: str | None, out: str, storage: StorageConfig | None = None,
              tracking_uri: str | None = None) -> dict:
    """Write the reports and the worklist of ``job``'s rows (default: the latest night) under
    ``out``; returns the counts and the errors."""
    rows = job_rows(scores, job, storage)
    if rows.empty:
        raise ValueError(f"no scored rows in {scores}" + (f" for job {job}" if job else ""))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    worklist(rows).to_csv(folder / "worklist.csv", index=False)
    dicom = rows[rows["status"].isin(SCORED_STATUSES) & rows["study_instance_uid"].notna() & rows["sop_instance_uid"].notna()]
    # One measurement per image: two copies of a file are one SOP instance (the newest row counts).
    dicom = dicom.sort_values("scored_at").drop_duplicates("sop_instance_uid", keep="last")
    written, errors = [], []
    named = algorithms(dicom, tracking_uri) if not dicom.empty else {}
    for study, group in dicom.groupby("study_instance_uid", sort=True):
        try:
            group = group.sort_values("sop_instance_uid")
            headers = [source_header(r.uri, r.sha256, study, r.sop_instance_uid, storage) for r in group.itertuples()]
            results = [(float(r.covid_probability), None if pd.isna(r.screen_positive) else bool(r.screen_positive),
                        str(r.classifier_name), str(r.classifier_version)) for r in group.itertuples()]
            report = study_report(headers, results, algorithms=named)
            path = folder / f"{study}.dcm"
            report.save_as(path)
            back = read_back(path)          # what a PACS reads: the same images, in order
            if [b["sop_instance_uid"] for b in back] != list(group["sop_instance_uid"]):
                raise ValueError("the written report does not reference the scored images")
            written.append(str(path))
        except Exception as e:  # noqa: BLE001 - one study never stops the export
            errors.append({"study_instance_uid": study, "images": len(group),
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    pd.DataFrame(errors, columns=["study_instance_uid", "images", "error"]).to_csv(folder / "errors.csv", index=False)
    return {"jobs": sorted(rows["job_id"].unique()), "rows": len(rows), "dicom_images": len(dicom),
            "reports": written, "errors": errors, "out": str(folder.resolve()),
            "worklist": int(rows["screen_positive"].fillna(False).astype(bool).sum())}
