"""Checkpoints as safetensors + JSON: loading never unpickles code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cxr.models import build_model

WEIGHTS, META, RESUME = "model.safetensors", "meta.json", "resume.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(model: nn.Module, folder: Path, meta: dict) -> Path:
    """Write the weights and ``meta`` into ``folder``. ``meta`` names the ``model`` architecture
    and, where its builder takes any, the ``model_kwargs`` (e.g. num_classes) to rebuild it."""
    assert "model" in meta, "a checkpoint must name its architecture"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the architecture named in ``meta.json`` and load its safetensors weights."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    model = build_model(meta["model"], **meta.get("model_kwargs", {}))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))   # copies into the module's own (CPU) tensors
    return model.to(map_location).eval(), meta


def save_resume(folder: Path, state: dict) -> None:
    """What a loop needs to continue after this epoch (optimiser, scheduler, RNG states): tensors
    and plain values only, so ``load_resume`` reads it with ``weights_only`` (no code unpickled)."""
    torch.save(state, Path(folder) / RESUME)


def load_resume(checkpoint) -> dict | None:
    """The resume state of a Ray checkpoint, with its ``weights`` (a state_dict); None for none
    or for a checkpoint written before checkpoints carried one."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / RESUME).exists():
            return None
        state = torch.load(Path(folder) / RESUME, map_location="cpu", weights_only=True)
        state["weights"] = load_file(str(Path(folder) / WEIGHTS))
    return state


def log_checkpoint(tracking_uri: str, run_id: str, checkpoint_dir: Path, artifact_path: str = "checkpoint") -> None:
    """Attach a safetensors checkpoint (weights + meta.json) to a run, e.g. a pretraining run's best."""
    from cxr import tracking

    tracking.log_files(tracking_uri, run_id, [Path(checkpoint_dir) / f for f in (WEIGHTS, META)], artifact_path)


def load_run_checkpoint(tracking_uri: str, run_id: str, artifact_path: str = "checkpoint",
                        map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """The checkpoint a run logged with ``log_checkpoint`` (safetensors + JSON only)."""
    from cxr import tracking

    with tracking.run_files(tracking_uri, run_id, artifact_path) as local:
        return load_checkpoint(local, map_location)
