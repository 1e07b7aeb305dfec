"""Decode JPEG, PNG, TIFF and DICOM bytes to an 8-bit grayscale array.

The format is taken from the bytes, not the file name: archives hold PNGs named ``.jpg`` and
DICOMs with no extension. Anything that cannot be decoded raises :class:`BadImageError`
naming the file and the reason. Image size is checked from the header, before any pixel is
decoded, so a decompression bomb never allocates its pixels.

**Decoding at the models' resolution.** A hospital film is 2,000-3,000 px; the models look at
96-256 px. Given ``min_side`` (twice the largest size the screen needs,
``cxr.data.letterbox.decode_side``), decoding stops as close above it as the format allows,
and the longer side of the result is never below ``min_side``:

- JPEG (a file, or a DICOM's baseline 8-bit frame): libjpeg's DCT scaling (Pillow's ``draft``),
  1/2, 1/4 or 1/8, which skips most of the inverse DCT;
- JPEG 2000 (a DICOM's frame): OpenJPEG's resolution levels (Pillow's ``reduce``), which skip
  the finer wavelet bands' code blocks, the bulk of the work;
- uncompressed DICOM: the stored integers, block-averaged before any float conversion;
- RLE, JPEG lossless, JPEG-LS, 12-bit JPEG, PNG and TIFF have no coarser level: decoded whole
  by the fastest installed decoder (pylibjpeg-rle, pylibjpeg-libjpeg, OpenCV's libpng), then
  block-averaged as integers.

Block averages commute with the modality LUT (linear); the window and the 8-bit stretch are
applied after, on the small film. A DICOM is shown as a viewer shows it (``_display_ends``):
its window or VOI LUT, or its 8 bits as stored, set black and white, never a few extreme
pixels, which block averages would move. The screen answers the same from a reduced decode as
from a whole one (``tests/test_reduced_decode``: probabilities within 0.02). The same function
serves training, evaluation and scoring, so nothing drifts between them.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.errors
from PIL import Image, ImageOps, UnidentifiedImageError
import pydicom.multival
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless, UID)

from cxr.data.errors import BadImageError

log = logging.getLogger(__name__)

PIL_FORMATS = ("JPEG", "PNG", "TIFF")
_DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
# JPEG 2000 (lossless, lossy) and HTJ2K (lossless, lossless RPCL, lossy): coded in resolution levels.
_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                 "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
_NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@functools.lru_cache(maxsize=1)
def _cv2():
    """OpenCV, held to one thread (decoding runs one image per core: no nested pools), or None
    where it is not installed (the GPU machine's staged wheels): then NumPy block sums and
    Pillow's PNG decoder stand in, slower, with the same result."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    return cv2


@dataclass(frozen=True)
class Film:
    """A decoded film: ``gray`` (H, W) uint8, at least ``min_side`` on its longer side where the
    film is larger, and the film's own size (what scores record), before any reduction."""

    gray: np.ndarray
    height: int
    width: int


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


def decode_image(data: bytes, uri: str, limits: DecodeLimits = DecodeLimits(),
                 min_side: int | None = None) -> np.ndarray:
    """Decode ``data`` (the bytes of ``uri``) to a (H, W) uint8 grayscale array: the whole film,
    or with ``min_side`` reduced as the module says."""
    return decode_film(data, uri, limits, min_side).gray


def decode_film(data: bytes, uri: str, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None) -> Film:
    """``decode_image``, with the film's own height and width."""
    if len(data) == 0:
        raise BadImageError(uri, "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise BadImageError(uri, f"file too large: {len(data):,} bytes > limit {limits.max_bytes:,}")
    dicom, has_preamble = looks_like_dicom(data, uri)
    if dicom:
        return _decode_dicom(data, uri, limits, has_preamble, min_side)
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImageError(uri, f"not an image: content is not {', '.join(PIL_FORMATS)} or DICOM")
    return _decode_pil(data, uri, limits, fmt, min_side)


def reduction(height: int, width: int, min_side: int | None) -> int:
    """The largest whole factor a (height, width) film can be shrunk by with its longer side
    still at least ``min_side`` (1: none)."""
    return max(1, max(height, width) // min_side) if min_side else 1


def shrink(arr: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) integer or float pixels block-averaged by ``factor`` (OpenCV's area resampling:
    hand-written NumPy block sums are 4x slower, and Pillow's ``reduce`` has no 16-bit mode).

    The film is first trimmed, centred, to whole blocks (fewer than ``factor`` rows and
    columns, under 1% of a side): OpenCV averages whole blocks 7x faster than fractional ones,
    and the trim moves the content by under half a pixel of the model's image."""
    if factor <= 1:
        return arr
    h, w = arr.shape
    if h < factor or w < factor:
        return arr
    top, left = (h % factor) // 2, (w % factor) // 2
    arr = arr[top:top + h - h % factor, left:left + w - w % factor]
    cv2 = _cv2()
    if cv2 is None:
        h, w = arr.shape
        blocks = arr.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
        return np.round(blocks).astype(arr.dtype) if arr.dtype.kind in "iu" else blocks.astype(np.float32)
    if arr.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        arr = arr.astype(np.float32)
    return cv2.resize(arr, (arr.shape[1] // factor, arr.shape[0] // factor), interpolation=cv2.INTER_AREA)


def check_size(uri: str, width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise BadImageError(
            uri, f"image too large ({width}x{height} = {width * height:,} pixels > {limits.max_pixels:,}): "
            "possible decompression bomb")
    if min(width, height) < limits.min_side:
        raise BadImageError(uri, f"image too small ({width}x{height}, minimum side {limits.min_side} px)")


def _decode_pil(data: bytes, uri: str, limits: DecodeLimits, fmt: str, min_side: int | None) -> Film:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                width, height = im.size
                check_size(uri, width, height, limits)
                factor = reduction(height, width, min_side)
                cv2 = _cv2() if fmt == "png" else None
                if cv2 is not None and im.mode in ("L", "I;16", "I;16B") and _upright(im):
                    fast = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                    if fast is not None and fast.shape == (height, width):
                        return Film(_stretched(fast, factor), height, width)
                orientation = im.getexif().get(0x0112, 1)
                if fmt == "jpeg" and factor > 1 and im.mode == "L" and orientation == 1:
                    fast = _scaled_jpeg(data, width, height, factor)
                    if fast is not None:
                        return Film(np.ascontiguousarray(shrink(fast, reduction(*fast.shape, min_side))), height, width)
                if fmt == "jpeg" and factor > 1:
                    im.draft(im.mode, (-(-width // factor), -(-height // factor)))
                turned = orientation in (5, 6, 7, 8)     # EXIF orientations that swap sides
                im.load()
                im = ImageOps.exif_transpose(im)
                gray = _pil_to_gray(im, reduction(im.size[1], im.size[0], min_side))
                return Film(gray, *((width, height) if turned else (height, width)))
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(uri, f"image too large: possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise BadImageError(uri, f"corrupt {fmt.upper()}: header cannot be parsed") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(uri, f"corrupt or truncated {fmt.upper()}: {e}") from e


def _scaled_jpeg(data: bytes, width: int, height: int, factor: int) -> np.ndarray | None:
    """A grayscale JPEG decoded by libjpeg-turbo at the coarsest DCT scale that keeps
    ``factor``'s size, through simplejpeg: 14% faster than Pillow's ``draft`` on 2048 px films
    (the same pixels), which is most of a 2048 px JPEG's cost. None where it declines (the
    caller's Pillow path then decodes the file and names what is wrong with it)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        out = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=-(-height // factor),
                                     min_width=-(-width // factor))
    except (ValueError, RuntimeError):
        return None
    return out[:, :, 0] if out.ndim == 3 else out


def _upright(im: Image.Image) -> bool:
    """No EXIF orientation to apply (OpenCV's PNG reader would not apply it). Only the chunks
    before the pixels are looked at: ``getexif`` on a PNG decodes the whole image to find an
    eXIf chunk after them, which no X-ray writer emits."""
    return "exif" not in im.info


def _stretched(arr: np.ndarray, factor: int) -> np.ndarray:
    """A gray array (8-bit, or deeper and stretched) shrunk by ``factor``, as uint8."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(shrink(arr, factor))
    return _to_uint8(shrink(arr, factor), float(arr.min()), float(arr.max()))


def _pil_to_gray(im: Image.Image, factor: int = 1) -> np.ndarray:
    if im.mode == "L":
        return np.ascontiguousarray(shrink(np.asarray(im, dtype=np.uint8), factor))
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit depth: stretch the used range to 8 bits, as a default display window would.
        deep = np.asarray(im)
        return _stretched(deep if deep.dtype in (np.uint16, np.int16) else deep.astype(np.float32), factor)
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGB")
    return np.ascontiguousarray(shrink(np.asarray(im.convert("L"), dtype=np.uint8), factor))


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Stretch [lo, hi] (by default the array's own range) to [0, 255]."""
    arr = arr.astype(np.float32)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


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


def _decode_dicom(data: bytes, uri: str, limits: DecodeLimits, has_preamble: bool, min_side: int | None) -> Film:
    with warnings.catch_warnings():
        # pydicom warns about what it tolerates; we raise on what it cannot decode instead.
        warnings.simplefilter("ignore", UserWarning)
        return _dicom_pixels(data, uri, limits, has_preamble, min_side)


def _dicom_pixels(data: bytes, uri: str, limits: DecodeLimits, has_preamble: bool, min_side: int | None) -> Film:
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
    check_size(uri, cols, rows, limits)
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    factor = reduction(rows, cols, min_side)
    reduced = _reduced_stored(ds, tsyntax, frames, min_side) if factor > 1 else None
    if reduced is not None:
        arr, stored_range = reduced
    else:
        arr = _full_stored(ds, uri, tsyntax)
        if frames > 1:
            log.info("%s: %d frames, using the first", uri, frames)
            arr = arr[0]
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR") or arr.ndim == 3:
            # pydicom's pixel_array already gives RGB for YBR data: converting again shifts colours.
            if arr.ndim != 3:
                raise BadImageError(uri, f"unsupported DICOM: photometric interpretation {photometric}")
            gray = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"), dtype=np.uint8)
            return Film(np.ascontiguousarray(shrink(gray, factor)), rows, cols)
        stored_range = (arr.min(), arr.max())
        arr = shrink(arr, factor)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImageError(uri, f"unsupported DICOM: photometric interpretation {photometric}")
    _check_lut_tags(ds, uri)
    ends = np.array(_display_ends(ds, arr, stored_range), dtype=np.float64 if arr.dtype.kind == "f" else np.int64)
    try:
        # The LUTs are pointwise: the two ends go through them apart from the pixels (no copy of
        # the film) and become the 8-bit stretch's range.
        pixels = np.asarray(apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0), dtype=np.float32)
        lo, hi = sorted(float(v) for v in apply_voi_lut(apply_modality_lut(ends, ds), ds, index=0))
    except Exception as e:  # noqa: BLE001 - pydicom's LUT code raises many types on odd headers
        raise BadImageError(uri, f"DICOM LUT cannot be applied: {type(e).__name__}: {e}") from e
    out = _to_uint8(pixels, lo, hi)
    if photometric == "MONOCHROME1":               # MONOCHROME1: high values are dark
        out = 255 - out
    return Film(out, rows, cols)


def _windowed(ds) -> bool:
    """A window (both tags: pydicom applies none with one) or a VOI LUT to apply."""
    return all(ds.get(t) not in (None, "") for t in ("WindowCenter", "WindowWidth")) or "VOILUTSequence" in ds


def _rescaled(ds) -> bool:
    """A modality LUT or a rescale other than the identity (many writers add slope 1, intercept 0)."""
    if "ModalityLUTSequence" in ds:
        return True
    try:
        return float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0
    except (TypeError, ValueError):
        return True


def _shown_as_stored(ds) -> bool:
    """Whether black and white are the representable range (a window or VOI LUT sets the
    contrast, or 8 bits are shown as stored), rather than the film's own range."""
    return _windowed(ds) or (int(ds.get("BitsStored", 8) or 8) <= 8 and not _rescaled(ds))


def _display_ends(ds, arr: np.ndarray, stored_range: tuple | None) -> tuple:
    """The stored values shown as black and white (before MONOCHROME1's inversion), as a viewer
    shows the film: with a window or a VOI LUT, or 8-bit values and no rescale, the whole
    representable range, so the window (or nothing) decides the contrast; otherwise the
    film's own range, a viewer's default window (the whole film's: ``stored_range``)."""
    bits = int(ds.get("BitsStored", 8) or 8)
    if arr.dtype.kind in "iu" and _shown_as_stored(ds):
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return stored_range if stored_range is not None else (arr.min(), arr.max())


def _full_stored(ds, uri: str, tsyntax) -> np.ndarray:
    """The stored pixel values, whole, by the fastest installed decoder."""
    try:
        if tsyntax in (JPEGLSLossless, JPEGLSNearLossless) and _has_module("jpeg_ls"):
            ds.pixel_array_options(decoding_plugin="pyjpegls")   # CharLS: 3.5x pylibjpeg-libjpeg's JPEG-LS
        return ds.pixel_array
    except NotImplementedError as e:
        raise BadImageError(uri, f"unsupported DICOM: no decoder for transfer syntax "
                                 f"{getattr(tsyntax, 'name', tsyntax)} ({e})") from e
    except (RuntimeError, ValueError, AttributeError, KeyError, EOFError, OSError) as e:
        if "plugin" in str(e) or "decoder" in str(e).lower():
            raise BadImageError(uri, f"unsupported DICOM: transfer syntax "
                                     f"{getattr(tsyntax, 'name', tsyntax)} cannot be decoded ({e})") from e
        raise BadImageError(uri, f"corrupt DICOM pixel data: {e}") from e


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _reduced_stored(ds, tsyntax: UID | None, frames: int, min_side: int) -> tuple[np.ndarray, tuple | None] | None:
    """(the first frame's stored values reduced towards ``min_side``, the whole frame's (min, max) or
    None where the codec never saw it), for the common grayscale films; None for anything else,
    and for anything odd, so that the full path decodes it and names what is wrong."""
    try:
        allocated = int(ds.BitsAllocated)
        if (int(ds.get("SamplesPerPixel", 1)) != 1 or allocated not in (8, 16)
                or str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2")):
            return None
        rows, cols, bits, signed = int(ds.Rows), int(ds.Columns), int(ds.BitsStored), int(ds.PixelRepresentation)
        if not 1 <= bits <= allocated or signed not in (0, 1):
            return None                          # the full path names the header's fault
        factor = reduction(rows, cols, min_side)
        if tsyntax in _NATIVE_SYNTAXES and len(ds.PixelData) < frames * rows * cols * allocated // 8:
            return None                          # short pixel data: the full path says so
        if tsyntax not in _NATIVE_SYNTAXES and tsyntax != RLELossless and not _shown_as_stored(ds):
            # JPEG and JPEG 2000 reduced never see the whole film's range, which sets this
            # film's contrast (a marker's few extreme pixels vanish in block averages).
            return None
        if tsyntax in _NATIVE_SYNTAXES or tsyntax == RLELossless:
            raw = ds.PixelData
            if tsyntax == RLELossless:
                # pylibjpeg-rle called directly: pydicom's pixel_array around it costs 40% more.
                from rle.utils import decode_pixel_data

                raw = decode_pixel_data(get_frame(raw, 0, number_of_frames=frames), version=2, rows=rows,
                                        columns=cols, bits_allocated=int(ds.BitsAllocated), byteorder="<")
            arr = _native_frame(raw, rows, cols, int(ds.BitsAllocated), bits, signed)
            return (shrink(arr, factor), (arr.min(), arr.max())) if arr is not None else None
        if tsyntax == JPEGBaseline8Bit and int(ds.BitsAllocated) == 8 and not signed:
            frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
            arr = _scaled_jpeg(frame, cols, rows, factor)
            if arr is None or arr.shape[0] < rows // factor:
                return None
            return shrink(arr, reduction(*arr.shape, min_side)), None
        if str(tsyntax) in _J2K_SYNTAXES and not signed:
            return _j2k_reduced(get_frame(ds.PixelData, 0, number_of_frames=frames), bits, factor, min_side)
    except Exception as e:  # noqa: BLE001 - the full path decodes it again and names the problem
        log.debug("reduced decode fell back to the full one: %s: %s", type(e).__name__, e)
    return None


def _native_frame(pixel_data: bytes, rows: int, cols: int, allocated: int, stored: int, signed: int) -> np.ndarray | None:
    """The first frame of uncompressed little-endian pixel data, with the bits beyond
    ``stored`` cleared (or the sign extended), as the standard defines them."""
    dtype = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}[(allocated, signed)]
    n = rows * cols
    if len(pixel_data) < n * allocated // 8:
        return None
    arr = np.frombuffer(pixel_data, dtype=dtype, count=n).reshape(rows, cols)
    if dtype == np.int8:
        return None                             # rare; pydicom's path handles it
    if stored < allocated:
        unused = allocated - stored
        arr = (arr << unused) >> unused if signed else arr & ((1 << stored) - 1)
    return arr


def _j2k_reduced(frame: bytes, bits: int, factor: int, min_side: int) -> tuple[np.ndarray, None] | None:
    """A JPEG 2000 frame decoded at a resolution level whose longer side is at least twice
    ``min_side`` (each level halves it; ``factor`` is the whole reduction), then shrunk the
    rest of the way by block averages."""
    levels, precision = _j2k_header(frame)
    if levels is None or precision != bits:
        return None
    # One level finer than the coarsest that fits: a wavelet's low band is sharper than the
    # whole path's triangle filter and aliases. Measured with the shipped screen on non-square
    # films: the coarsest level moved probabilities by up to 0.020 (102 films/s at 2048 px),
    # one finer by 0.016 (34 films/s); the block-averaged formats by 0.006.
    level = max(0, min(levels, factor.bit_length() - 2))
    with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
        im.reduce = level
        im.load()
        arr = np.asarray(im)
    if arr.ndim != 2:
        return None
    if arr.dtype == np.uint16 and precision < 16:
        arr = arr >> (16 - precision)           # Pillow scales samples up to 16 bits; the LUTs want stored values
    return shrink(arr, reduction(*arr.shape, min_side)), None


def _j2k_header(codestream: bytes) -> tuple[int | None, int | None]:
    """(decomposition levels, first component's precision) from a codestream's main header
    (its SIZ and COD segments), or (None, None)."""
    if codestream[:2] != b"\xff\x4f":
        return None, None
    levels = precision = None
    at = 2
    while at + 4 <= len(codestream) and (levels is None or precision is None):
        marker, length = codestream[at + 1], int.from_bytes(codestream[at + 2:at + 4], "big")
        body = codestream[at + 4:at + 2 + length]
        if marker == 0x51 and len(body) >= 37:          # SIZ: ... Csiz (2) then Ssiz per component
            ssiz = body[36]
            precision = None if ssiz & 0x80 else (ssiz & 0x7F) + 1
        elif marker == 0x52 and len(body) >= 6:         # COD: Scod, SGcod (4), then levels
            levels = body[5]
        elif marker == 0x90:                            # start of tile: the main header is over
            break
        at += 2 + length
    return levels, precision
