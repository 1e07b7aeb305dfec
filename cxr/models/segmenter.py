"""Lung segmenter: smp Unet on one grayscale channel, one logit per pixel."""

from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import nn

from cxr.models import register


@register("unet-resnet34", task="segmenter", input_size=256)
def unet_resnet34() -> nn.Module:
    # encoder_weights=None: the default would download ImageNet weights at run time.
    return smp.Unet(encoder_name="resnet34", encoder_weights=None, in_channels=1, classes=1)


@register("unet-tiny", task="segmenter", input_size=64)
def unet_tiny() -> nn.Module:
    """Test twin: resnet18 encoder, narrow decoder; for 64 px tests.

    All 5 encoder levels are kept: smp builds the whole encoder even at a smaller depth, and the
    unused levels would break DDP (parameters without gradients).
    """
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=1,
                    decoder_channels=(64, 32, 16, 16, 8))
