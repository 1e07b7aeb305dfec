"""``cxr export-sr``: one scoring job's results for the PACS and for people: a DICOM SR per
scored DICOM study (``cxr.dicom_sr``) and a CSV worklist of its screen-positives.

A study whose source headers cannot be read again, or whose report cannot be built, is listed
in ``errors.csv`` with the reason; the other studies are still written."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc

from cxr.data.dicom_header import IDENTITY_COLUMNS, read_header
from cxr.data.storage import StorageConfig, read_bytes
from cxr.dicom_sr import read_back, study_report
from cxr.scores_table import latest_job, read_scores

log = logging.getLogger(__name__)

SCORED = ("ok", "flagged")
WORKLIST_COLUMNS = ["study_instance_uid", "accession_number", "patient_id", "study_date", "series_instance_uid",
                    "sop_instance_uid", "uri", "covid_probability", "covid_threshold", "predicted_label", "status",
                    "qc_flags", "classifier_name", "classifier_version", "job_id"]
READ_LIMIT = 256 * 2**20      # bytes read again for a header (the header is at the front; the read is bounded)


def job_rows(scores: str, job: str | None, storage: StorageConfig | None) -> tuple[str | None, pd.DataFrame]:
    job = job or latest_job(scores, storage)
    if job is None:
        return None, pd.DataFrame()
    columns = ["uri", "status", "predicted_label", "covid_probability", "covid_threshold", "screen_positive",
               "qc_flags", "classifier_name", "classifier_version", "job_id", *IDENTITY_COLUMNS]
    return job, read_scores(scores, storage, columns, filter=pc.field("job_id") == job).to_pandas()


def worklist(rows: pd.DataFrame) -> pd.DataFrame:
    """The screen-positives, most probable first, with what finds them in the RIS and PACS."""
    positives = rows[rows["screen_positive"].fillna(False).astype(bool)]
    out = positives.sort_values("covid_probability", ascending=False)[WORKLIST_COLUMNS].copy()
    out["qc_flags"] = out["qc_flags"].map(lambda flags: ";".join(flags) if flags is not None else "")
    return out


def export_sr(scores: str, job: str | None, out: str, storage: StorageConfig | None = None) -> dict:
    """Write the job's reports and worklist under ``out``; returns the counts and the errors."""
    job, rows = job_rows(scores, job, storage)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if job is None:
        raise ValueError(f"no scored rows in {scores}")
    worklist(rows).to_csv(folder / "worklist.csv", index=False)
    dicom = rows[rows["status"].isin(SCORED) & rows["study_instance_uid"].notna() & rows["sop_instance_uid"].notna()]
    written, errors = [], []
    for study, group in dicom.groupby("study_instance_uid", sort=True):
        try:
            group = group.sort_values("sop_instance_uid")
            headers = []
            for uri in group["uri"]:
                header = read_header(read_bytes(uri, storage, READ_LIMIT))
                if header is None:
                    raise ValueError(f"{uri} is no longer a readable DICOM")
                headers.append(header)
            results = [(float(p), None if pd.isna(s) else bool(s))
                       for p, s in zip(group["covid_probability"], group["screen_positive"])]
            name, version = group["classifier_name"].iloc[0], group["classifier_version"].iloc[0]
            report = study_report(headers, results, str(name), str(version))
            path = folder / f"{study}.dcm"
            report.save_as(path)
            back = read_back(path)          # what a PACS reads: the same images, in order
            if [b["sop_instance_uid"] for b in back] != [h.SOPInstanceUID for h in headers]:
                raise ValueError("the written report does not reference the scored images")
            written.append(str(path))
        except Exception as e:  # noqa: BLE001 - one study never stops the export
            errors.append({"study_instance_uid": study, "images": len(group),
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    pd.DataFrame(errors, columns=["study_instance_uid", "images", "error"]).to_csv(folder / "errors.csv", index=False)
    return {"job": job, "rows": len(rows), "dicom_images": len(dicom), "reports": written, "errors": errors,
            "worklist": int(rows["screen_positive"].fillna(False).astype(bool).sum()), "out": str(folder.resolve())}
