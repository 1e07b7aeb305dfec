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
