"""Model weights as safetensors, stored as float32, bfloat16 or int8: loading never unpickles.

int8 is weight-only, per output channel, symmetric: ``w ~= q * scale`` with ``q`` int8 and one
float32 scale per output channel, for every weight of 2 or more dimensions (convolutions,
linear layers); biases and BatchNorm statistics stay float32. It exists for bundles that must
be small (a ResNet50 and a UNet-resnet34 are 188 MB as float32, 94 MB as bfloat16, 48 MB as
int8; a bundle carried off the GPU machine may be 64 MiB). Hand-written (about 15 lines)
because torch's quantization APIs produce quantized modules and pickled state, not plain
tensors that safetensors can hold and any float model can load. Weights are always
dequantized to float32 on load: inference runs in float32 or autocast as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

DTYPES = ("float32", "bfloat16", "int8")
SCALE_SUFFIX = ".__int8_scale"


def state_for_storage(state: dict[str, torch.Tensor], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """A state dict as it is written: floats cast to ``dtype`` (int8: quantized with scales)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown weights dtype {dtype!r}; choices: {list(DTYPES)}")
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if not t.is_floating_point():
            out[name] = t                                     # e.g. BatchNorm's num_batches_tracked
        elif dtype == "bfloat16":
            out[name] = t.to(torch.bfloat16)
        elif dtype == "int8" and t.ndim >= 2:
            scale = t.float().abs().amax(dim=tuple(range(1, t.ndim)), keepdim=True).clamp_min(1e-12) / 127
            out[name] = (t.float() / scale).round().clamp(-127, 127).to(torch.int8)
            out[name + SCALE_SUFFIX] = scale.float().contiguous()
        else:
            out[name] = t.float()
    return out


def state_from_storage(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict back from ``state_for_storage``'s output."""
    out = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if scale is not None:
            out[name] = t.float() * scale
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return out


def save_weights(model: nn.Module, path: str | Path, dtype: str = "float32") -> Path:
    module = model.module if hasattr(model, "module") else model       # the bare module under DDP
    save_file(state_for_storage(module.state_dict(), dtype), str(path), metadata={"cxr_dtype": dtype})
    return Path(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` (strict: every tensor must match)."""
    model.load_state_dict(state_from_storage(load_file(str(path))))
    return model


def stored_dtype(path: str | Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("cxr_dtype", "float32")
