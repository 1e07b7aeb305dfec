"""Classifier: torchvision ResNet whose FC layer is replaced by dropout + a linear layer.

The head is global-average-pool -> dropout -> linear, which is what lets Grad-CAM come out of
the forward pass (``cxr.explain``). ``logits_and_features`` returns both in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import ResNet

from cxr.models import register

log = logging.getLogger(__name__)

# Modules in forward order; the paper's stage 1 freezes "the first five": conv1 .. layer1.
STEM = ("conv1", "bn1", "relu", "maxpool")
BLOCKS = ("layer1", "layer2", "layer3", "layer4")


def _with_head(model: ResNet, num_classes: int, dropout: float) -> ResNet:
    model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


@register("resnet50", task="classifier", input_size=224)
def resnet50_classifier(num_classes: int = 4, dropout: float = 0.5) -> nn.Module:
    return _with_head(resnet50(weights=None), num_classes, dropout)


@register("resnet18-tiny", task="classifier", input_size=64)
def resnet18_tiny(num_classes: int = 4, dropout: float = 0.5) -> nn.Module:
    """Test twin: the same head and module names as resnet50, at 64 px."""
    return _with_head(resnet18(weights=None), num_classes, dropout)


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), layer4 features (B, K, h, w)) in one forward pass."""
    for name in STEM + BLOCKS:
        x = getattr(model, name)(x)
    return model.fc(torch.flatten(model.avgpool(x), 1)), x


def head_weights(model: nn.Module) -> torch.Tensor:
    """The linear layer's (C, K) weights: the class activation map weights."""
    return model.fc[-1].weight


def set_trainable(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Freeze every parameter except those under the named top-level modules ("all": none frozen).

    Unknown names fail and list the choices. Frozen BatchNorm layers are also kept in eval
    mode by ``freeze_batchnorm`` so their running statistics stay those of pretraining.
    Returns the names of the trainable top-level modules.
    """
    names = [n for n, _ in model.named_children()]
    wanted = names if "all" in trainable else list(trainable)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"unknown module(s) {unknown} in trainable; choices: {names + ['all']}")
    for name, module in model.named_children():
        module.requires_grad_(name in wanted)
    return wanted


def freeze_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers with frozen weights in eval mode (call after ``model.train()``)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state_dict file (.safetensors, or .pth read with ``weights_only=True``: no code is
    unpickled). Torchvision's own ResNet files name the head ``fc.*``; ours is ``fc.1.*``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {("fc.1." + k[3:] if k.startswith("fc.") and not k.startswith("fc.1.") else k): v
            for k, v in state.items()}


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], origin: str = "weights") -> list[str]:
    """Load the tensors whose name and shape match (a 1000- or 3-class head is skipped, so a new
    head starts fresh). Returns the loaded keys; fails if none match."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{origin}: no tensor matches the model's names and shapes")
    model.load_state_dict(usable, strict=False)
    log.info("initialised %d/%d tensors from %s", len(usable), len(own), origin)
    return sorted(usable)
