import numpy as np
import pytest

from cxr.data.letterbox import PAD_VALUE, letterbox
from tests.inputs import real_gray


def test_wide_image_is_padded_top_and_bottom_without_distortion():
    img = np.zeros((100, 200), np.uint8)
    img[:, :100] = 255
    out = letterbox(img, 64)
    assert out.shape == (64, 64)
    assert (out[:16] == PAD_VALUE).all() and (out[48:] == PAD_VALUE).all()
    content = out[16:48]
    # Left half white, right half black: the aspect ratio survived.
    assert (content[:, :31] == 255).all() and (content[:, 33:] == 0).all()


def test_tall_image_is_padded_left_and_right():
    out = letterbox(np.full((300, 150), 7, np.uint8), 100)
    assert (out[:, :25] == PAD_VALUE).all() and (out[:, 75:] == PAD_VALUE).all()
    assert (out[:, 25:75] == 7).all()


def test_square_image_at_size_is_unchanged():
    img = real_gray()[:200, :200].copy()
    assert np.array_equal(letterbox(img, 200), img)


def test_real_image_downscale_and_upscale():
    img = real_gray()
    for size in (64, 224, 512):
        out = letterbox(img, size, fill=0)
        assert out.shape == (size, size) and out.dtype == np.uint8


def test_rejects_color():
    with pytest.raises(ValueError, match="grayscale"):
        letterbox(np.zeros((10, 10, 3), np.uint8), 8)
