"""Screening results back to the PACS: one DICOM Structured Report per study (highdicom).

Each report is a TID 1500 Measurement Report (Comprehensive 3D SR) on the study, with one
measurement group per scored image of it: the COVID-19 probability (a measurement) and the
screen result at the card's threshold (a qualitative evaluation), each naming the algorithm and
its version (TID 4019), the group referencing the source image by its SOP instance. The patient
and study modules come from the source images' own headers (the evidence), so a report files
under the right patient and study whatever the scores table stores of the identifiers.

The concepts this screen reports have no standard code, so they use the private coding scheme
``99CXR`` (DICOM's convention for local codes: the "99" prefix); the procedure and the results
use SNOMED CT.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

CODING_SCHEME = "99CXR"
COVID_PROBABILITY = hd.sr.CodedConcept("covid-probability", CODING_SCHEME, "COVID-19 probability")
SCREEN_RESULT = hd.sr.CodedConcept("covid-screen", CODING_SCHEME, "COVID-19 screen result at the operating point")
POSITIVE = hd.sr.CodedConcept("10828004", "SCT", "Positive")
NEGATIVE = hd.sr.CodedConcept("260385009", "SCT", "Negative")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MANUFACTURER = "cxr (research use, not for diagnosis)"


# Type 2 attributes of the patient and study modules the SR copies from its evidence: present,
# possibly empty. Archives hold files without some of them; an empty value is what DICOM allows.
TYPE2_FROM_EVIDENCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def as_evidence(header: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a source image's header with the Type 2 attributes the report copies present."""
    ds = pydicom.Dataset()
    ds.update(header)
    ds.file_meta = getattr(header, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in TYPE2_FROM_EVIDENCE:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def image_group(source: pydicom.Dataset, covid_probability: float, screen_positive: bool | None,
                algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One image's measurement group, referencing it by its SOP instance."""
    evaluations = ([] if screen_positive is None else
                   [hd.sr.QualitativeEvaluation(SCREEN_RESULT, POSITIVE if screen_positive else NEGATIVE)])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"cxr screen of {source.SOPInstanceUID}"),
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(COVID_PROBABILITY, float(covid_probability), NO_UNITS, algorithm_id=algorithm)],
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def algorithm(name: str, version: str, weights_sha256: str | None, threshold: float | None,
              software: str) -> hd.sr.AlgorithmIdentification:
    """The algorithm a measurement names: cxr's software version as the version (the registry's
    version number differs between registries holding the same weights), and as parameters the
    model's content digest, the screening threshold and the registry entry."""
    return hd.sr.AlgorithmIdentification(
        name=f"cxr {name}", version=software,
        parameters=[f"weights sha256 {weights_sha256 or 'not recorded'}",
                    f"covid threshold {threshold:.6g}" if threshold is not None else "covid threshold none",
                    f"registry {name} v{version}"])


def study_report(sources: Sequence[pydicom.Dataset], results: Sequence[tuple[float, bool | None, str, str]],
                 instance_number: int = 1, algorithms: dict | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of one study: ``sources`` (its scored images' headers, one study) and their
    ``results`` (COVID probability, screen-positive or None when not screened, and the name and
    version of the classifier that scored that image), in order. ``algorithms``: (name,
    version) -> its ``AlgorithmIdentification`` (default: name and version alone)."""
    sources = [as_evidence(s) for s in sources]
    studies = {s.StudyInstanceUID for s in sources}
    if len(studies) != 1:
        raise ValueError(f"one report per study: got {len(studies)} studies")
    versions = sorted({f"{name} v{version}" for _, _, name, version in results})
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="cxr", model_name="; ".join(versions)))
    algorithms = algorithms or {}
    groups = [image_group(s, p, positive, algorithms.get((name, version))
                          or hd.sr.AlgorithmIdentification(name=name, version=version))
              for s, (p, positive, name, version) in zip(sources, results)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=instance_number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)


def read_back(path) -> list[dict]:
    """What a PACS would read from a written report: per measurement group, the referenced SOP
    instance, the COVID probability and the screen result ('Positive', 'Negative' or None)."""
    sr = hd.sr.srread(path)
    out = []
    for group in sr.content.get_image_measurement_groups():
        (image,) = group.source_images
        probability = next(m.value for m in group.get_measurements() if m.name == COVID_PROBABILITY)
        results = [q.value.meaning for q in group.get_qualitative_evaluations() if q.name == SCREEN_RESULT]
        out.append({"sop_instance_uid": image.referenced_sop_instance_uid, "covid_probability": float(probability),
                    "screen": results[0] if results else None,
                    "study_instance_uid": sr.StudyInstanceUID, "patient_id": sr.PatientID})
    return out
