"""Test inputs built from real sample images: good DICOM/PNG variants and every bad-input kind.

``python -m tests.inputs`` prints the bad-input table of docs/RESULTS.md from the decoder's
actual answers.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MPEG2MPML, SecondaryCaptureImageStorage, generate_uid

from cxr.config import SAMPLE_DATA

REAL_JPEG = sorted((SAMPLE_DATA / "covid" / "images").glob("*.jpg"))[0]


def real_gray() -> np.ndarray:
    return np.asarray(Image.open(REAL_JPEG).convert("L"))


def real_jpeg_bytes() -> bytes:
    return REAL_JPEG.read_bytes()


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(photometric: str = "MONOCHROME2", transfer_syntax=ExplicitVRLittleEndian,
                pixels: bool = True, window: bool = True, compress_to=None, window_width: float | None = None,
                rescale_slope_text: str | None = None) -> bytes:
    """A real X-ray as a 12-bit DICOM, with rescale and window tags like a CR/DR file."""
    gray = real_gray().astype(np.uint16) * 16            # 8 -> 12 bits stored
    stored = (4095 - gray) if photometric == "MONOCHROME1" else gray
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "TEST"
    if pixels:
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
        if window:
            ds.WindowCenter, ds.WindowWidth = 2 * 2048 - 1000, 2 * 4096 if window_width is None else window_width
        if rescale_slope_text is not None:     # as a broken modality writes it: text in a number tag
            ds.add_new(0x00281053, "LO", rescale_slope_text)
        ds.PixelData = stored.tobytes()
    if compress_to is not None:
        ds.compress(compress_to)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        from pydicom.encaps import encapsulate
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
               "CT": "1.2.840.10008.5.1.4.1.1.2", "RG": "1.2.840.10008.5.1.4.1.1.1"}


def tagged_dicom(gray: np.ndarray, modality: str = "CR", view: str | None = "PA", body_part: str | None = "CHEST",
                 patient_id: str = "PAT-0001", accession: str = "ACC-0001", study_uid: str | None = None) -> bytes:
    """A real image as the DICOM a modality sends: CR, DX or CT storage with the patient, study,
    series and acquisition tags a PACS gives it (``view``/``body_part`` None: tag absent)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = patient_id, "Test^Patient", "F", "054Y"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = accession, "20261127", "101500"
    ds.Modality, ds.Manufacturer, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = modality, "cxr-tests", "1", 1, 1
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(gray, np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_header_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header announcing width x height pixels, with one tiny IDAT chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_header_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """The real JPEG with its frame header (SOF0) patched to announce width x height."""
    data = bytearray(real_jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# kind -> (file name, bytes factory). Every one must raise BadImageError.
BAD_INPUTS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "empty file": ("empty.jpg", lambda: b""),
    "truncated JPEG (first half)": ("truncated.jpg", lambda: real_jpeg_bytes()[: len(real_jpeg_bytes()) // 2]),
    "truncated PNG (first half)": ("truncated.png", lambda: png_bytes(real_gray())[: len(png_bytes(real_gray())) // 2]),
    "JPEG with garbage after the header": ("garbled.jpg", lambda: real_jpeg_bytes()[:200] + b"\x00" * 4000),
    "not an image (text)": ("notes.txt", lambda: b"patient list\nid,name\n1,x\n"),
    "wrong extension (PDF named .jpg)": ("report.jpg", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
    "wrong extension (ZIP named .png)": ("archive.png", lambda: b"PK\x03\x04" + b"\x00" * 100),
    "1x1 image": ("tiny.png", lambda: png_bytes(np.zeros((1, 1), np.uint8))),
    "decompression bomb, PNG header 30,000x30,000": ("bomb.png", png_header_bomb),
    "decompression bomb, JPEG header 30,000x30,000": ("bomb.jpg", jpeg_header_bomb),
    "DICOM without pixel data": ("nopixels.dcm", lambda: dicom_bytes(pixels=False)),
    "unsupported DICOM (MPEG-2 transfer syntax)": ("video.dcm", lambda: dicom_bytes(transfer_syntax=MPEG2MPML)),
    "truncated DICOM (first half)": ("truncated.dcm", lambda: dicom_bytes()[: len(dicom_bytes()) // 2]),
    "corrupt DICOM (preamble, then garbage)": ("garbage.dcm", lambda: b"\x00" * 128 + b"DICM" + b"\xff" * 300),
    "DICOM with WindowWidth 0": ("window0.dcm", lambda: dicom_bytes(window_width=0)),
    "DICOM with RescaleSlope as text": ("slope-text.dcm", lambda: dicom_bytes(rescale_slope_text="abc")),
    "gzip-compressed JPEG (never decompressed)": ("xray.jpg.gz", lambda: gzip.compress(real_jpeg_bytes())),
}

# Real JPEGs under names that pyarrow would once decompress by extension: all decode.
COMPRESSED_NAMES = ("xray.gz", "xray.bz2", "xray.lz4", "xray.zst")


def markdown_table() -> str:
    from cxr.data.decode import decode_image
    from cxr.data.errors import BadImageError

    rows = ["| input | file | result |", "|---|---|---|"]
    for kind, (name, make) in BAD_INPUTS.items():
        try:
            arr = decode_image(make(), name)
            result = f"decoded {arr.shape} (NOT rejected)"
        except BadImageError as e:
            result = f"`BadImageError: {e}`"
        rows.append(f"| {kind} | `{name}` | {result.replace('|', '/')} |")
    name = "xray.jpg"
    arr = decode_image(png_bytes(real_gray()), name)
    rows.append(f"| PNG bytes named `.jpg` (format from content) | `{name}` | decoded {arr.shape}, not an error |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
