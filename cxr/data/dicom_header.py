"""A DICOM input's identity and routing, from its header alone (no pixel data is decoded).

- **Identity**: the study, series and instance UIDs, accession number, patient id, dates and
  the acquisition tags a worklist, a PACS or a reviewer needs (``IDENTITY_COLUMNS``), one
  scores-row column each; null for inputs that are not DICOM, or where a tag is absent.
- **Pseudonyms**: the patient identifiers (``PATIENT_IDENTIFIERS``) are replaced by a keyed
  hash by default: HMAC-SHA256 under a key from ``$CXR_PSEUDONYM_KEY``, never from a file in
  the repo. The same patient gets the same pseudonym every night under the same key, and only
  the key's holder can link a pseudonym to a patient (by hashing their own list). Without a key
  the identifiers are left out (null) rather than stored; ``keep_identifiers`` stores them as
  they are (an opt-out for a site whose output store is itself inside the hospital's PHI
  boundary).
- **Routing** (``skip_reason``): the model is for frontal chest radiographs, so a DICOM whose
  Modality is not a radiograph (CR, DX), whose BodyPartExamined names another body part, or
  whose ViewPosition is lateral is skipped, with the reason. An absent tag never skips: many
  radiographs lack BodyPartExamined or ViewPosition, and the image's own checks still apply.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import warnings
from dataclasses import dataclass

import pydicom
import pydicom.errors

# scores-row column -> DICOM keyword
IDENTITY_COLUMNS = {
    "study_instance_uid": "StudyInstanceUID", "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID", "accession_number": "AccessionNumber", "patient_id": "PatientID",
    "study_date": "StudyDate", "study_time": "StudyTime", "modality": "Modality", "view_position": "ViewPosition",
    "body_part_examined": "BodyPartExamined", "patient_age": "PatientAge", "patient_sex": "PatientSex",
    "manufacturer": "Manufacturer", "photometric_interpretation": "PhotometricInterpretation",
}
PATIENT_IDENTIFIERS = ("patient_id", "accession_number")
KEY_ENV = "CXR_PSEUDONYM_KEY"

RADIOGRAPH_MODALITIES = {"CR", "DX"}        # computed and digital radiography
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX_CHEST", "PECHO", "POITRINE", "BRUST"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE LATERAL"}


@dataclass(frozen=True)
class Pseudonymiser:
    """Patient identifiers -> ``pseudo-<16 hex>`` under ``key`` (HMAC-SHA256); ``keep`` stores
    them as they are; neither (no key): they are left out."""

    key: bytes | None = None
    keep: bool = False

    @classmethod
    def from_environment(cls, keep: bool = False) -> "Pseudonymiser":
        key = os.environ.get(KEY_ENV, "")
        return cls(key.encode() if key else None, keep)

    @property
    def policy(self) -> str:
        """How patient identifiers are stored, in words (for the job's log line)."""
        if self.keep:
            return "patient identifiers kept as they are (--keep-identifiers)"
        if self.key:
            return f"patient identifiers pseudonymised (HMAC-SHA256 under ${KEY_ENV})"
        return f"patient identifiers left out: ${KEY_ENV} is not set (set it to keep pseudonyms)"

    def __call__(self, value: str | None) -> str | None:
        if value is None or self.keep:
            return value
        if not self.key:
            return None
        return "pseudo-" + hmac.new(self.key, value.encode(), hashlib.sha256).hexdigest()[:16]


def read_header(data: bytes) -> pydicom.Dataset | None:
    """The header of DICOM ``data`` (without pixel data), or None when the bytes are not a
    DICOM file with the standard preamble or cannot be parsed (the decoder then says why)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword, None)
    except Exception:  # noqa: BLE001 - a malformed element must not lose the row
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def identity(ds: pydicom.Dataset | None, pseudonymise: Pseudonymiser) -> dict[str, str | None]:
    """The identity columns of one input (all null without a header)."""
    if ds is None:
        return dict.fromkeys(IDENTITY_COLUMNS)
    row = {column: _text(ds, keyword) for column, keyword in IDENTITY_COLUMNS.items()}
    for column in PATIENT_IDENTIFIERS:
        row[column] = pseudonymise(row[column])
    return row


def skip_reason(ds: pydicom.Dataset | None) -> str | None:
    """Why this DICOM is not for the model (a person's reading), or None to screen it."""
    if ds is None:
        return None
    modality = (_text(ds, "Modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"not a radiograph: Modality {modality} (screened: {', '.join(sorted(RADIOGRAPH_MODALITIES))})"
    body_part = (_text(ds, "BodyPartExamined") or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return f"not a chest film: BodyPartExamined {body_part}"
    view = (_text(ds, "ViewPosition") or "").upper()
    if view in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view}): the model reads frontal films only"
    return None
