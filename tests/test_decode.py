"""Decoding real images in every supported container, and a typed error for every bad input."""

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxr.data.decode import DecodeLimits, decode_image, sniff_format
from cxr.data.errors import BadImageError
from tests.inputs import BAD_INPUTS, REAL_JPEG, dicom_bytes, png_bytes, real_gray, real_jpeg_bytes


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def test_real_jpeg_decodes_to_uint8_gray():
    out = decode_image(real_jpeg_bytes(), str(REAL_JPEG))
    assert out.dtype == np.uint8 and out.ndim == 2
    assert np.array_equal(out, real_gray())


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_8bit_modes_give_the_same_gray(mode):
    gray = real_gray()
    from PIL import Image
    im = Image.fromarray(gray).convert(mode)
    import io
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), f"x-{mode}.png")
    assert out.shape == gray.shape
    assert np.abs(out.astype(int) - gray).max() <= 1  # palette/RGB round trips may be off by one


def test_png_16bit_is_stretched_to_8bit():
    gray = real_gray()
    deep = (gray.astype(np.uint16) * 257 // 16).astype(np.uint16)  # 12-bit values in a 16-bit PNG
    out = decode_image(png_bytes(deep), "deep.png")
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert _corr(out, gray) > 0.999


def test_format_comes_from_content_not_extension():
    assert sniff_format(png_bytes(real_gray())) == "png"
    out = decode_image(png_bytes(real_gray()), "named_wrong.jpg")
    assert np.array_equal(out, real_gray())


@pytest.mark.parametrize("compress_to", [None, RLELossless, JPEG2000Lossless], ids=["raw", "rle", "j2k"])
def test_dicom_monochrome2_with_rescale_and_window(compress_to):
    out = decode_image(dicom_bytes(compress_to=compress_to), "x.dcm")
    assert out.shape == real_gray().shape
    assert _corr(out, real_gray()) > 0.999


def test_dicom_monochrome1_is_inverted_back():
    mono1 = decode_image(dicom_bytes("MONOCHROME1"), "m1.dcm")
    mono2 = decode_image(dicom_bytes("MONOCHROME2"), "m2.dcm")
    assert np.abs(mono1.astype(int) - mono2).max() <= 1


def test_dicom_without_preamble_is_read_by_extension():
    data = dicom_bytes()
    out = decode_image(data[132:], "no_preamble.dcm")  # raw dataset, no 128-byte preamble/DICM
    assert _corr(out, real_gray()) > 0.999


def test_dicom_voi_window_is_applied():
    # A narrow window saturates: more pixels at 0 and 255 than without a window.
    wide = decode_image(dicom_bytes(window=False), "w.dcm")
    import pydicom, io
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    ds.WindowCenter, ds.WindowWidth = ds.WindowCenter, ds.WindowWidth / 4
    buf = io.BytesIO()
    ds.save_as(buf)
    narrow = decode_image(buf.getvalue(), "n.dcm")
    saturated = lambda a: int(((a == 0) | (a == 255)).sum())
    assert saturated(narrow) > saturated(wide) + 1000


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_typed_error_naming_file_and_reason(kind):
    name, make = BAD_INPUTS[kind]
    with pytest.raises(BadImageError) as info:
        decode_image(make(), f"s3://archive/{name}")
    assert str(info.value).startswith(f"s3://archive/{name}: ")
    assert info.value.reason


def test_size_limits_are_config():
    data = real_jpeg_bytes()
    with pytest.raises(BadImageError, match="too large"):
        decode_image(data, "x.jpg", DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data, "x.jpg", DecodeLimits(max_pixels=100 * 100))
    with pytest.raises(BadImageError, match="too small"):
        decode_image(data, "x.jpg", DecodeLimits(min_side=1000))


def test_ybr_full_dicom_is_colour_converted_once():
    """pydicom already gives RGB for YBR data; a second conversion shifted every colour."""
    import io

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    gray = real_gray()
    rgb = np.stack([gray, np.roll(gray, 5, 0), 255 - gray], -1).astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(decode_image(buf.getvalue(), "ybr.dcm").astype(int) - expected).max() <= 2


@pytest.mark.parametrize("tag,value,reason", [("WindowWidth", 0, "DICOM WindowWidth is 0"),
                                              ("RescaleSlope", "abc", "DICOM RescaleSlope is not a number: 'abc'")])
def test_odd_dicom_lut_tags_are_named(tag, value, reason):
    data = dicom_bytes(window_width=value) if tag == "WindowWidth" else dicom_bytes(rescale_slope_text=value)
    with pytest.raises(BadImageError, match=reason):
        decode_image(data, "odd.dcm")


def test_bytes_are_read_as_bytes_whatever_the_name(tmp_path):
    """pyarrow decompressed *.gz / .bz2 / .lz4 / .zst by extension, past the size limit."""
    import gzip

    from cxr.data.storage import read_bytes
    from tests.inputs import COMPRESSED_NAMES

    for name in COMPRESSED_NAMES:                    # a real JPEG under each name: read as is, decoded
        (tmp_path / name).write_bytes(real_jpeg_bytes())
        assert read_bytes(str(tmp_path / name), max_bytes=10**7) == real_jpeg_bytes()
    bomb = gzip.compress(b"\0" * 50_000_000)         # 50 MB of zeros, 49 KB on disk
    (tmp_path / "zeros.gz").write_bytes(bomb)
    assert read_bytes(str(tmp_path / "zeros.gz"), max_bytes=1_000_000) == bomb
