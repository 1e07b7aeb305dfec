"""A DICOM's identity in its row, patient identifiers pseudonymised, and routing: only frontal
chest radiographs reach the models (``cxr.data.dicom_header``, the decode stage)."""

from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pytest

from cxr.data.dicom_header import IDENTITY_COLUMNS, Pseudonymiser, identity, read_header, skip_reason
from cxr.scoring import decode_batch
from tests.inputs import png_bytes, real_gray, real_jpeg_bytes, tagged_dicom


def header(**tags):
    return read_header(tagged_dicom(real_gray(), **tags))


def test_a_dicom_without_its_preamble_is_read_as_the_decoder_reads_it():
    data = tagged_dicom(real_gray(), "CT", None)[128 + 4:]          # no preamble, no DICM
    assert read_header(data, "x.jpg") is None
    ds = read_header(data, "slice.dcm")
    assert ds is not None and skip_reason(ds).startswith("not a radiograph: Modality CT")


def test_identity_columns_come_from_the_header():
    ds = header(modality="DX", view="AP", patient_id="PAT-7", accession="ACC-9", study_uid="1.2.3.4")
    row = identity(ds, Pseudonymiser(keep=True))
    assert set(row) == set(IDENTITY_COLUMNS)
    assert (row["study_instance_uid"], row["modality"], row["view_position"]) == ("1.2.3.4", "DX", "AP")
    assert (row["patient_id"], row["accession_number"], row["study_date"]) == ("PAT-7", "ACC-9", "20261127")
    assert row["sop_instance_uid"] == ds.SOPInstanceUID and row["photometric_interpretation"] == "MONOCHROME2"
    assert identity(read_header(real_jpeg_bytes()), Pseudonymiser(keep=True)) == dict.fromkeys(IDENTITY_COLUMNS)


def test_patient_identifiers_are_pseudonymised_under_the_key_and_never_stored_without_one(monkeypatch):
    ds = header(patient_id="PAT-7", accession="ACC-9")
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", "site-secret")
    first = identity(ds, Pseudonymiser.from_environment())
    assert first["patient_id"].startswith("pseudo-") and "PAT-7" not in first["patient_id"]
    assert first["accession_number"] != first["patient_id"]
    assert identity(header(patient_id="PAT-7"), Pseudonymiser.from_environment())["patient_id"] == first["patient_id"]
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", "another-site")
    assert identity(ds, Pseudonymiser.from_environment())["patient_id"] != first["patient_id"]
    monkeypatch.delenv("CXR_PSEUDONYM_KEY")
    unkeyed = identity(ds, Pseudonymiser.from_environment())
    assert unkeyed["patient_id"] is None and unkeyed["accession_number"] is None
    assert unkeyed["study_instance_uid"] == ds.StudyInstanceUID          # UIDs stay: results go back by them
    assert identity(ds, Pseudonymiser.from_environment(keep=True))["patient_id"] == "PAT-7"


@pytest.mark.parametrize("tags, reason", [
    (dict(modality="CR", view="PA"), None),
    (dict(modality="DX", view="AP"), None),
    (dict(modality="CR", view=None, body_part=None), None),          # absent tags never skip
    (dict(modality="CR", view="LL"), "lateral view (ViewPosition LL)"),
    (dict(modality="CT", view=None), "not a radiograph: Modality CT"),
    (dict(modality="DX", view="PA", body_part="HAND"), "not a chest film: BodyPartExamined HAND"),
    (dict(modality="DX", view="AP", body_part="PORTABLE CHEST"), None),   # free text: any chest word keeps it
    (dict(modality="RG", view="PA", body_part="CHEST PA"), None),
    (dict(modality="CR", view="PA\\LL"), "lateral view"),                  # multi-valued
    (dict(modality="CR", view="LATERAL LEFT"), "lateral view"),
    (dict(modality="CR", view="LAO"), "oblique view"),
])
def test_only_frontal_chest_radiographs_are_screened(tags, reason):
    got = skip_reason(header(**tags))
    assert got == reason if reason is None else got.startswith(reason)


def write_archive(folder, gray):
    """Real DICOMs made from a sample film (PA, AP, lateral, CT, a hand), a photo and noise."""
    study = "1.2.826.0.1.3680043.8.498.777"                                  # the PA and the lateral of one study
    files = {"pa.dcm": tagged_dicom(gray, "CR", "PA", patient_id="P1", study_uid=study),
             "ap": tagged_dicom(gray, "DX", "AP", patient_id="P2"),             # no extension, as PACS exports
             "lateral.dcm": tagged_dicom(gray, "CR", "LL", patient_id="P1", study_uid=study),
             "ct.dcm": tagged_dicom(gray, "CT", None, patient_id="P3"),
             "hand.dcm": tagged_dicom(gray, "DX", "PA", body_part="HAND", patient_id="P4"),
             "photo.jpg": (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes(),
             "noise.png": png_bytes(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(str(folder / name) for name in files)


def test_decode_stage_routes_and_identifies_every_input(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", "site-secret")
    gray = real_gray()
    uris = write_archive(tmp_path, gray)
    out = decode_batch({"uri": np.array(uris, dtype=object)}, (64, 32), 128, set(), 2**26, None,
                       pseudonymiser=Pseudonymiser.from_environment())
    rows = {u.rsplit("/", 1)[1]: i for i, u in enumerate(out["uri"])}
    status = {name: out["status"][i] for name, i in rows.items()}
    assert status == {"pa.dcm": "ok", "ap": "ok", "lateral.dcm": "skipped", "ct.dcm": "skipped", "hand.dcm": "skipped",
                      "photo.jpg": "ok", "noise.png": "ok"}
    assert out["skip_reason"][rows["ct.dcm"]].startswith("not a radiograph")
    assert out["skip_reason"][rows["pa.dcm"]] is None
    pa_row = rows["pa.dcm"]
    assert out["modality"][pa_row] == "CR" and out["view_position"][pa_row] == "PA"
    assert out["patient_id"][pa_row] == out["patient_id"][rows["lateral.dcm"]] != out["patient_id"][rows["ap"]]
    assert out["patient_id"][pa_row].startswith("pseudo-")
    assert (out["image_height"][pa_row], out["image_width"][pa_row]) == gray.shape
    assert out["image_height"][rows["ct.dcm"]] == -1                       # skipped: never decoded
    assert out["study_instance_uid"][rows["photo.jpg"]] is None
    assert not out["image"][rows["ct.dcm"]].any() and out["image"][pa_row].any()
    pa.table({k: list(v) for k, v in out.items() if k not in ("image", "seg_image")})      # Arrow takes every column
