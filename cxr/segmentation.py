"""Running a segmenter: lung probabilities for a batch, and test-split evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr.data.images import load_image, load_mask
from cxr.data.storage import StorageConfig
from cxr.metrics import dice_per_image
from cxr.preprocess import segmenter_input


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, 1, S, S) uint8 letterboxed images -> (N, 1, S, S) float lung probabilities (on CPU)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = segmenter_input(images[start:start + batch_size].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(torch.sigmoid(model(batch).float()).cpu())
    return torch.cat(out)


def evaluate_segmenter(model: nn.Module, rows: pd.DataFrame, size: int,
                       storage: StorageConfig | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per-image Dice on ``rows`` (uri, mask_uri, source), and the arrays behind it for overlays."""
    images = torch.from_numpy(np.stack([load_image(u, size, storage) for u in rows["uri"]]))[:, None]
    masks = torch.from_numpy(np.stack([load_mask(u, size, storage) for u in rows["mask_uri"]]))[:, None]
    probs = predict_probs(model.eval(), images)
    predicted = (probs >= 0.5).float()
    dice = dice_per_image(predicted, masks.float()).numpy()
    per_image = pd.DataFrame({"uri": rows["uri"].to_numpy(), "source": rows["source"].to_numpy(), "dice": dice})
    return per_image, {"images": images[:, 0].numpy(), "masks": masks[:, 0].numpy(),
                       "predicted": predicted[:, 0].numpy().astype(np.uint8)}
