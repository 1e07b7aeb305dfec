"""A grayscale film re-encoded as hospital archives store it: DICOM in each transfer syntax a
PACS sends (uncompressed 16-bit, RLE, JPEG 2000, JPEG-LS, JPEG lossless, JPEG baseline 8-bit,
JPEG extended 12-bit) and plain JPEG / PNG files. Inputs made at run time for the reduced-decode
test and the decode benchmark, from ``fullres/`` films, so nothing large is committed.

The encoders are pydicom's (pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS, its own for
RLE) and imagecodecs' libjpeg-turbo for the JPEG processes pydicom cannot encode (a test
dependency).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# name -> (transfer syntax or None for a plain file, bits stored)
FORMATS: dict[str, tuple[str | None, int]] = {
    "jpeg": (None, 8),
    "png": (None, 8),
    "dicom-uncompressed-16bit": ("1.2.840.10008.1.2.1", 12),
    "dicom-rle": ("1.2.840.10008.1.2.5", 12),
    "dicom-jpeg2000-lossless": ("1.2.840.10008.1.2.4.90", 12),
    "dicom-jpegls-lossless": ("1.2.840.10008.1.2.4.80", 12),
    "dicom-jpeg-lossless": ("1.2.840.10008.1.2.4.70", 12),
    "dicom-jpeg-baseline-8bit": ("1.2.840.10008.1.2.4.50", 8),
    "dicom-jpeg-extended-12bit": ("1.2.840.10008.1.2.4.51", 12),
}
JPEG_QUALITY = 90


def resized(gray: np.ndarray, side: int) -> np.ndarray:
    """A square film brought to ``side`` px (the benchmark's 3000 px films come from 2048 px ones)."""
    if gray.shape == (side, side):
        return gray
    return np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


def encode(gray: np.ndarray, fmt: str) -> bytes:
    """``gray`` (H, W) uint8 as the bytes of ``fmt`` (a ``FORMATS`` key). 12-bit formats store
    ``gray * 16 + 5`` with a window over the whole range, as a detector's 12-bit output would."""
    syntax, bits = FORMATS[fmt]
    if syntax is None:
        out = io.BytesIO()
        Image.fromarray(gray).save(out, "JPEG" if fmt == "jpeg" else "PNG",
                                   **({"quality": JPEG_QUALITY} if fmt == "jpeg" else {}))
        return out.getvalue()
    stored = gray if bits == 8 else gray.astype(np.uint16) * 16 + 5
    ds = _dataset(stored, bits)
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    if fmt in ("dicom-rle", "dicom-jpeg2000-lossless", "dicom-jpegls-lossless"):
        ds.compress(UID(syntax))
    elif fmt.startswith("dicom-jpeg"):
        import imagecodecs

        options = {"lossless": True, "predictor": 1} if fmt == "dicom-jpeg-lossless" else {"level": JPEG_QUALITY}
        frame = imagecodecs.jpeg8_encode(stored, bitspersample=bits, **options)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dataset(stored: np.ndarray, bits: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    if bits > 8:     # a window over the stored range, as a modality sets one
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    return ds
