"""Augmentation. Geometric transforms move an image and its mask together (torchvision v2
treats ``tv_tensors.Mask`` with nearest interpolation); intensity changes touch the image only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def segmentation_augment() -> v2.Transform:
    return v2.Compose([
        v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


def classifier_augment_batch(images: torch.Tensor, degrees: float = 10.0, scale: tuple[float, float] = (0.9, 1.1),
                             jitter: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's augmentation (random rotation, scaling, brightness/contrast), per sample, on
    the batch's own device.

    Hand-written over ``affine_grid``/``grid_sample`` because torchvision's v2 transforms draw
    one set of parameters per call, i.e. per batch; this draws one per image and runs on the
    GPU with the batch, so the input pipeline only moves uint8 tensors. ``images``: (B, C, H, W)
    float in [0, 255]; returns the same. ``generator``, if given, must live on the images' device:
    parameters drawn on the CPU and copied over would make every step wait for the GPU (a
    blocking host-to-device copy synchronises the stream).
    """
    b, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=device) * (high - low) + low

    angle = torch.deg2rad(uniform(-degrees, degrees))
    zoom = uniform(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(1 - jitter, 1 + jitter).view(b, 1, 1, 1)
    contrast = uniform(1 - jitter, 1 + jitter).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean * brightness).clamp(0, 255)


def photometric_augment_batch(images: torch.Tensor, gamma: tuple[float, float] = (0.7, 1.5), max_sharpen: float = 1.0,
                              max_noise: float = 8.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Archive style, not anatomy: a random gamma, a random blur or sharpening (unsharp mask of
    strength in [-1, ``max_sharpen``]: negative blurs), and Gaussian noise of a random standard
    deviation up to ``max_noise`` grey levels, per image. ``images``: (B, C, H, W) float in
    [0, 255]; returns the same. Each archive has its own detector, processing and contrast;
    varying them in training makes them less useful as a shortcut."""
    b, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=device) * (high - low) + low).view(b, 1, 1, 1)

    out = 255.0 * (images / 255.0).clamp(0, 1) ** uniform(*gamma)
    blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = out + uniform(-1.0, max_sharpen) * (out - blurred)
    noise = torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype)
    return (out + noise * uniform(0.0, max_noise)).clamp(0, 255)
