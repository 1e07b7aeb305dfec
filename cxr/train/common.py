"""Pieces every Ray Train loop shares: device/autocast, cross-worker sums, reporting."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from torch import nn

from cxr.data.storage import StorageConfig
from cxr.train.checkpoints import save_checkpoint


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; plain fp32 on CPU, where bf16 training is slower here."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over all workers (a no-op on one)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def report(metrics: dict, model: nn.Module, meta: dict, save: bool) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint when ``save``."""
    if save and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, Path(tmp), meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def ray_storage(path: str, storage: StorageConfig) -> dict:
    """RunConfig arguments for Ray Train and Tune results under a local folder or an s3:// prefix."""
    from cxr.data.storage import filesystem_for, is_s3

    if is_s3(path):
        fs, inner = filesystem_for(path, storage)
        return {"storage_path": inner, "storage_filesystem": fs}
    return {"storage_path": str(Path(path).resolve())}
