"""Decoding on the scorer's device: baseline JPEGs (files, and the frames of JPEG-baseline
DICOMs) decoded in batches by torchvision's ``decode_jpeg`` (nvJPEG on a GPU), then letterboxed
there with an antialiased resize.

On a GPU this takes the entropy decoding, the one part of a JPEG's decode that DCT scaling
cannot skip (``cxr.data.decode``), off the CPU cores that feed the GPU. The decode tasks only
find the frame (``jpeg_frame``: a header read, no pixel); the scoring actor decodes the batch.
On a CPU device the same code runs through libjpeg-turbo, which is how it is tested here.

Only inputs whose pixels are shown as stored are sent this way: an 8-bit, one-component,
upright JPEG file, or a MONOCHROME2 JPEG-baseline DICOM with one frame and no rescale, window or
VOI LUT. Anything else (a window to apply, MONOCHROME1, colour, EXIF rotation) goes through
``cxr.data.decode`` on the CPU, whose answer this path matches within the test's tolerance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_DISPLAY_TAGS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTSequence",
                 "ModalityLUTSequence")


@dataclass(frozen=True)
class JpegFrame:
    """A baseline JPEG to decode on the device, and the film's size from its header."""

    data: bytes
    height: int
    width: int


def jpeg_frame(data: bytes, header=None) -> JpegFrame | None:
    """The baseline 8-bit grayscale JPEG that ``data`` is or holds (``header``: the DICOM
    header already read, ``cxr.data.dicom_header.read_header``), or None where the film needs
    the CPU path. Reads headers only."""
    from PIL import Image

    from cxr.data.decode import sniff_format

    if header is not None:
        frame = _dicom_frame(data, header)
        return frame if frame is not None and is_baseline(frame.data) else None
    if sniff_format(data) != "jpeg" or not is_baseline(data):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            if im.mode != "L" or im.getexif().get(0x0112, 1) != 1:
                return None
            width, height = im.size
    except Exception:  # noqa: BLE001 - the CPU path reads it again and names what is wrong
        return None
    return JpegFrame(data, height, width)


def is_baseline(data: bytes) -> bool:
    """Whether a JPEG's frame is baseline 8-bit Huffman (SOF0, or SOF1 at 8 bits): what every
    device decoder takes. Lossless, arithmetic-coded, progressive and 12-bit frames go to the
    CPU path. Reads the markers up to the frame header."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:                       # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):      # a start of frame
            precision = data[at + 4] if at + 4 < len(data) else 0
            return marker == 0xC0 or (marker == 0xC1 and precision == 8)
        if marker in (0xD9, 0xDA):               # end of image, start of scan: no frame header
            return False
        at += 2 + length
    return False


def _dicom_frame(data: bytes, header) -> JpegFrame | None:
    from pydicom.uid import JPEGBaseline8Bit

    meta = getattr(header, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != JPEGBaseline8Bit:
        return None
    if (str(header.get("PhotometricInterpretation", "")).upper() != "MONOCHROME2"
            or int(header.get("NumberOfFrames", 1) or 1) != 1 or int(header.get("SamplesPerPixel", 1) or 1) != 1
            or any(header.get(t) not in (None, "") for t in _DISPLAY_TAGS)):
        return None
    try:
        import pydicom
        from pydicom.encaps import get_frame

        ds = pydicom.dcmread(io.BytesIO(data))
        return JpegFrame(get_frame(ds.PixelData, 0, number_of_frames=1), int(ds.Rows), int(ds.Columns))
    except Exception:  # noqa: BLE001 - the CPU path reads it again and names what is wrong
        return None


def decode_letterboxed(frames: list[bytes], sizes: tuple[int, int | None], fill: int,
                       device: "torch.device") -> tuple[list[np.ndarray | None], list[np.ndarray | None], list[str | None]]:
    """Each frame decoded on ``device`` and letterboxed at the classifier's and the segmenter's
    size: (classifier images, segmenter images, errors), one per frame. One batched decode;
    where it fails, each frame alone, so one corrupt JPEG is that input's error only."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in frames]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.GRAY, device=device)
        errors: list[str | None] = [None] * len(frames)
    except RuntimeError:
        decoded, errors = [], []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.GRAY, device=device))
                errors.append(None)
            except RuntimeError as e:
                decoded.append(None)
                # torchvision's message starts with its source file and line: keep what follows.
                errors.append(f"corrupt or truncated JPEG: {str(e).splitlines()[0].split(', ')[-1][:200]}")
    out: list[list[np.ndarray | None]] = [[], []]
    for image in decoded:
        for k, size in enumerate(sizes):
            out[k].append(letterbox_on_device(image, size, fill).cpu().numpy() if image is not None and size else None)
    return out[0], out[1], errors


def letterbox_on_device(image: "torch.Tensor", size: int, fill: int) -> "torch.Tensor":
    """(1, H, W) uint8 -> (size, size) uint8 on the image's device, as ``cxr.data.letterbox``:
    scaled to fit by an antialiased bilinear resize (Pillow's filter), centred, padded."""
    import torch
    import torch.nn.functional as F

    _, h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                            align_corners=False)[0, 0].round().clamp(0, 255).to(torch.uint8)
    out = torch.full((size, size), fill, dtype=torch.uint8, device=image.device)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out
