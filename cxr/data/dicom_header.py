"""A DICOM input's identity and routing, from its header alone (no pixel data is decoded).

- **Identity**: the study, series and instance UIDs, accession number, patient id, dates and
  the acquisition tags a worklist, a PACS or a reviewer needs (``IDENTITY_COLUMNS``), one
  scores-row column each; null for inputs that are not DICOM, or where a tag is absent.
- **Pseudonyms**: the patient identifiers (``PATIENT_IDENTIFIERS``) are replaced by a keyed
  hash by default: HMAC-SHA256 under a key from ``$CXR_PSEUDONYM_KEY``, never from a file in
  the repo. The same patient gets the same pseudonym every night under the same key, and only
  the key's holder can turn a pseudonym back into a patient id (by hashing their own list).
  Without a key the identifiers are left out (null) rather than stored; ``keep_identifiers``
  stores them as they are. This is pseudonymisation, not anonymisation: the UIDs (which lead
  back to the patient in the PACS), dates, age and sex are stored as they are.
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
import re
import warnings
from dataclasses import dataclass

import pydicom
import pydicom.errors
import pydicom.multival

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

RADIOGRAPH_MODALITIES = {"CR", "DX", "RG"}  # computed, digital and (digitised) conventional radiography
# Body-part and view values are free text in practice ("CHEST PA", "PORTABLE CHEST", "Thorax_Lungs",
# multi-valued): they are read as words, and any chest word keeps the film.
CHEST_WORDS = {"CHEST", "THORAX", "THORAC", "THORAX_CHEST", "LUNG", "LUNGS", "TORAX", "TORACE", "PECHO", "POITRINE",
               "BRUST", "THX", "CXR"}
LATERAL_WORDS = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT", "LLD", "RLD", "XTABLE", "DECUBITUS"}
OBLIQUE_WORDS = {"RAO", "LAO", "RPO", "LPO", "OBL", "OBLIQUE"}


def _words(value: str) -> set[str]:
    """Upper-case words of a tag's text: split on anything but letters and digits (the backslash
    of a multi-valued tag too)."""
    return {w for w in re.split(r"[^A-Z0-9]+", value.upper()) if w}


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


def read_header(data: bytes, uri: str = "") -> pydicom.Dataset | None:
    """The header of DICOM ``data`` (without pixel data), or None when the bytes are not DICOM
    or cannot be parsed (the decoder then says why). What counts as DICOM is the decoder's rule
    (``cxr.data.decode``): the standard preamble, or a DICOM file extension without it."""
    from cxr.data.decode import looks_like_dicom

    dicom, has_preamble = looks_like_dicom(data, uri)
    if not dicom:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=not has_preamble)
        return ds if len(ds) else None
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def header_text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A tag's value as text (a multi-valued tag's values joined by a backslash, as DICOM
    writes them), or None where it is absent or empty."""
    try:
        value = ds.get(keyword, None)
    except Exception:  # noqa: BLE001 - a malformed element must not lose the row
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def identity(ds: pydicom.Dataset | None, pseudonymise: Pseudonymiser) -> dict[str, str | None]:
    """The identity columns of one input (all null without a header)."""
    if ds is None:
        return dict.fromkeys(IDENTITY_COLUMNS)
    row = {column: header_text(ds, keyword) for column, keyword in IDENTITY_COLUMNS.items()}
    for column in PATIENT_IDENTIFIERS:
        row[column] = pseudonymise(row[column])
    return row


def skip_reason(ds: pydicom.Dataset | None) -> str | None:
    """Why this DICOM is not for the model (a person's reading), or None to screen it."""
    if ds is None:
        return None
    modality = (header_text(ds, "Modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"not a radiograph: Modality {modality} (screened: {', '.join(sorted(RADIOGRAPH_MODALITIES))})"
    body_part = header_text(ds, "BodyPartExamined") or ""
    if body_part and not _words(body_part) & CHEST_WORDS:
        return f"not a chest film: BodyPartExamined {body_part}"
    view = header_text(ds, "ViewPosition") or ""
    if _words(view) & LATERAL_WORDS:
        return f"lateral view (ViewPosition {view}): the model reads frontal films only"
    if _words(view) & OBLIQUE_WORDS:
        return f"oblique view (ViewPosition {view}): the model reads frontal films only"
    return None


_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def age_years(patient_age: str | None) -> float | None:
    """A DICOM Age String (``054Y``, ``006M``, ``002W``, ``010D``) in years; None where it is
    absent or not one (free text, an empty tag)."""
    text = (patient_age or "").strip().upper()
    # ASCII digits only: str.isdigit() also takes "²" or "٥", which int() refuses or misreads.
    if not re.fullmatch(r"[0-9]{1,3}[DWMY]", text, flags=re.ASCII):
        return None
    return int(text[:-1]) * _AGE_UNITS[text[-1]]
