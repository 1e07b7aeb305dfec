"""Decode JPEG, PNG, TIFF and DICOM bytes to an 8-bit grayscale array.

The format is taken from the bytes, not the file name: archives hold PNGs named ``.jpg`` and
DICOMs with no extension. Anything that cannot be decoded raises :class:`BadImageError`
naming the file and the reason. Image size is checked from the header, before any pixel is
decoded, so a decompression bomb never allocates its pixels.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.errors
from PIL import Image, ImageOps, UnidentifiedImageError
import pydicom.multival
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxr.data.errors import BadImageError

log = logging.getLogger(__name__)

PIL_FORMATS = ("JPEG", "PNG", "TIFF")
_DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what counts as a plausible chest X-ray."""

    max_bytes: int = 256 * 2**20
    max_pixels: int = 64_000_000  # 8000 x 8000; the largest CR/DR detectors are ~4300 x 4300
    min_side: int = 32


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes: 'dicom', 'jpeg', 'png', 'tiff' or None."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def looks_like_dicom(data: bytes, uri: str) -> tuple[bool, bool]:
    """(whether ``data`` is read as DICOM, whether it has the standard preamble): the preamble,
    or no other known format and a DICOM file extension."""
    fmt = sniff_format(data)
    return fmt == "dicom" or (fmt is None and uri.lower().endswith(_DICOM_EXTENSIONS)), fmt == "dicom"


def decode_image(data: bytes, uri: str, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode ``data`` (the bytes of ``uri``) to a (H, W) uint8 grayscale array."""
    if len(data) == 0:
        raise BadImageError(uri, "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise BadImageError(uri, f"file too large: {len(data):,} bytes > limit {limits.max_bytes:,}")
    dicom, has_preamble = looks_like_dicom(data, uri)
    if dicom:
        return _decode_dicom(data, uri, limits, has_preamble=has_preamble)
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImageError(uri, f"not an image: content is not {', '.join(PIL_FORMATS)} or DICOM")
    return _decode_pil(data, uri, limits, fmt)


def _check_size(uri: str, width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise BadImageError(
            uri, f"image too large ({width}x{height} = {width * height:,} pixels > {limits.max_pixels:,}): "
            "possible decompression bomb")
    if min(width, height) < limits.min_side:
        raise BadImageError(uri, f"image too small ({width}x{height}, minimum side {limits.min_side} px)")


def _decode_pil(data: bytes, uri: str, limits: DecodeLimits, fmt: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                _check_size(uri, *im.size, limits)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _pil_to_gray(im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(uri, f"image too large: possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise BadImageError(uri, f"corrupt {fmt.upper()}: header cannot be parsed") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(uri, f"corrupt or truncated {fmt.upper()}: {e}") from e


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit depth: stretch the used range to 8 bits, as a default display window would.
        return _to_uint8(np.asarray(im, dtype=np.float32))
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGB")
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _first_number(value) -> float:
    """A DICOM numeric tag's (first) value as a float; raises ValueError/TypeError if it is not one."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def _check_lut_tags(ds, uri: str) -> None:
    """The rescale and window tags pydicom applies, checked first, so an odd header is named
    ("DICOM WindowWidth is 0") instead of failing deep inside the LUT code."""
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if tag not in ds or ds[tag].value in (None, ""):
            continue
        try:
            value = _first_number(ds[tag].value)
        except (ValueError, TypeError, IndexError) as e:
            raise BadImageError(uri, f"DICOM {tag} is not a number: {ds[tag].value!r}") from e
        if not np.isfinite(value):
            raise BadImageError(uri, f"DICOM {tag} is {value}")
        if tag == "WindowWidth" and value <= 0:
            raise BadImageError(uri, f"DICOM WindowWidth is {value:g}: no window can be applied")
        if tag == "RescaleSlope" and value == 0:
            raise BadImageError(uri, "DICOM RescaleSlope is 0: every pixel would be the same")


def _decode_dicom(data: bytes, uri: str, limits: DecodeLimits, has_preamble: bool) -> np.ndarray:
    with warnings.catch_warnings():
        # pydicom warns about what it tolerates; we raise on what it cannot decode instead.
        warnings.simplefilter("ignore", UserWarning)
        return _dicom_pixels(data, uri, limits, has_preamble)


def _dicom_pixels(data: bytes, uri: str, limits: DecodeLimits, has_preamble: bool) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise BadImageError(uri, f"corrupt DICOM: {e}") from e
    if len(ds) == 0:
        raise BadImageError(uri, "corrupt DICOM: no data elements could be read")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID", None)
        kind = f" (SOP class {sop.name})" if sop is not None else ""
        raise BadImageError(uri, f"DICOM without pixel data{kind}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise BadImageError(uri, "corrupt DICOM: no Rows/Columns") from e
    _check_size(uri, cols, rows, limits)
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    try:
        arr = ds.pixel_array
    except NotImplementedError as e:
        raise BadImageError(uri, f"unsupported DICOM: no decoder for transfer syntax "
                                 f"{getattr(tsyntax, 'name', tsyntax)} ({e})") from e
    except (RuntimeError, ValueError, AttributeError, KeyError, EOFError, OSError) as e:
        if "plugin" in str(e) or "decoder" in str(e).lower():
            raise BadImageError(uri, f"unsupported DICOM: transfer syntax "
                                     f"{getattr(tsyntax, 'name', tsyntax)} cannot be decoded ({e})") from e
        raise BadImageError(uri, f"corrupt DICOM pixel data: {e}") from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if frames > 1:
        log.info("%s: %d frames, using the first", uri, frames)
        arr = arr[0]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR") or arr.ndim == 3:
        # pydicom's pixel_array already gives RGB for YBR data: converting again shifts colours.
        if arr.ndim != 3:
            raise BadImageError(uri, f"unsupported DICOM: photometric interpretation {photometric}")
        return np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"), dtype=np.uint8)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImageError(uri, f"unsupported DICOM: photometric interpretation {photometric}")
    _check_lut_tags(ds, uri)
    try:
        pixels = apply_modality_lut(arr, ds)          # stored values -> e.g. rescaled units
        pixels = apply_voi_lut(pixels, ds, index=0)    # window or VOI LUT, if the file has one
    except Exception as e:  # noqa: BLE001 - pydicom's LUT code raises many types on odd headers
        raise BadImageError(uri, f"DICOM LUT cannot be applied: {type(e).__name__}: {e}") from e
    out = _to_uint8(np.asarray(pixels, dtype=np.float32))
    if photometric == "MONOCHROME1":               # MONOCHROME1: high values are dark
        out = 255 - out
    return out
