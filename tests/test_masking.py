"""The masking function is exact on a known mask."""

import torch

from cxr.masking import dilate, mask_lungs


def _known():
    images = torch.full((2, 3, 32, 32), 100.0)
    probs = torch.zeros(2, 1, 32, 32)
    probs[0, :, 8:16, 4:12] = 0.9          # 8 x 8 = 64 lung pixels
    probs[1, :, 0:32, 0:16] = 0.6          # half the image
    return images, probs


def test_mask_lungs_without_dilation_is_exact():
    images, probs = _known()
    masked, fraction = mask_lungs(images, probs, dilation_px=0)
    expected = torch.zeros_like(images)
    expected[0, :, 8:16, 4:12] = 100
    expected[1, :, :, 0:16] = 100
    assert torch.equal(masked, expected)
    assert torch.allclose(fraction, torch.tensor([64 / 1024, 0.5]))


def test_dilation_grows_the_mask_by_exactly_n_pixels():
    images, probs = _known()
    masked, fraction = mask_lungs(images, probs, dilation_px=2)
    expected = torch.zeros_like(images)
    expected[0, :, 6:18, 2:14] = 100       # 2 px on every side
    expected[1, :, :, 0:18] = 100
    assert torch.equal(masked, expected)
    assert torch.allclose(fraction, torch.tensor([64 / 1024, 0.5]))  # fraction is before dilation


def test_probabilities_at_another_size_are_resized():
    images, probs = _known()
    small = probs[:, :, ::2, ::2]          # the segmenter ran at half the size
    masked, fraction = mask_lungs(images, small, dilation_px=0)
    assert torch.allclose(fraction, torch.tensor([64 / 1024, 0.5]), atol=0.02)
    assert masked[1, :, :, :14].eq(100).all() and masked[1, :, :, 18:].eq(0).all()


def test_threshold_and_dilate_helpers():
    m = torch.zeros(1, 1, 7, 7)
    m[0, 0, 3, 3] = 1
    assert dilate(m, 1).sum() == 9 and dilate(m, 0).sum() == 1
    _, fraction = mask_lungs(torch.ones(1, 1, 7, 7), m * 0.49)
    assert fraction.item() == 0
