"""Pieces every Ray Train loop shares: device/autocast, cross-worker sums, reporting."""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from cxr.data.storage import StorageConfig
from cxr.train.checkpoints import save_checkpoint, save_resume


# A failed worker (a lost node, a spot instance taken back) restarts the loop from the latest
# checkpoint this many times before the run fails (Ray Train's FailureConfig).
WORKER_RETRIES = 2


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


def report(metrics: dict, model: nn.Module, meta: dict, save: bool, resume: dict | None = None) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches a checkpoint when ``save`` (with
    ``resume``, the state to continue from: ``cxr.train.checkpoints.save_resume``)."""
    if save and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, Path(tmp), meta)
            if resume is not None:
                save_resume(Path(tmp), resume)
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


class ShardBatches(torch.utils.data.Sampler):
    """The batches of one worker's shard of a split: across the workers every image exactly once
    an epoch (no padding, no dropped tail: a figure over the split is over exactly the split),
    the same number of batches on every worker (DDP steps together), and the order fixed by
    ``seed`` and the epoch whatever the number of workers. Batches are as even as they can be,
    so none is much smaller than ``batch_size``. Hand-written: torch's DistributedSampler pads
    a shard by repeating images, or drops them."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, shuffle: bool, seed: int = 0):
        if n < world:
            raise ValueError(f"{n} images for {world} workers: every worker needs one")
        self.n, self.batch_size, self.rank, self.world, self.shuffle, self.seed = n, batch_size, rank, world, shuffle, seed
        self.epoch = 0
        # Equal batch counts on every worker, each batch non-empty and, where the shard allows, of 2
        # or more images (BatchNorm refuses a batch of 1 in training).
        smallest = n // world
        self.batches = max(1, min(math.ceil(math.ceil(n / world) / batch_size), max(1, smallest // 2)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        mine = order[self.rank::self.world].numpy()
        for chunk in np.array_split(mine, self.batches):
            yield chunk.tolist()

    def __len__(self) -> int:
        return self.batches


def shard_sampler(n: int, batch_size: int, shuffle: bool, seed: int) -> ShardBatches:
    """``ShardBatches`` of a split of ``n`` images for this Ray Train worker."""
    ctx = ray.train.get_context()
    return ShardBatches(n, batch_size, ctx.get_world_rank(), ctx.get_world_size(), shuffle, seed)


def shard_loader(dataset, batch_size: int, shuffle: bool, seed: int, pin: bool = False,
                 **loader_kwargs) -> tuple[torch.utils.data.DataLoader, ShardBatches]:
    """A DataLoader over this worker's ``ShardBatches`` (moved to the device by Ray Train), and
    the sampler (``set_epoch`` it every epoch)."""
    sampler = shard_sampler(len(dataset), batch_size, shuffle, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, pin_memory=pin, **loader_kwargs)
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), sampler


class DeviceBatches:
    """This worker's batches of a split (``ShardBatches``' order), gathered from tensors moved
    to the training device once: no DataLoader, no per-step host work or copy. Where the split
    does not fit in ``max_share`` of the device's free memory it stays in host memory and each
    batch is gathered there and copied over. Hand-written, as DataLoader's only job here
    would be an index gather, and its collation and host copies are what a fast GPU waits on."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], sampler: ShardBatches, device: torch.device,
                 max_share: float = 0.25):
        self.sampler, self.device = sampler, device
        size = sum(t.numel() * t.element_size() for t in tensors)
        fits = device.type != "cuda" or size <= max_share * torch.cuda.mem_get_info(device)[0]
        self.storage = device if fits else torch.device("cpu")
        self.tensors = tuple(t.to(self.storage) for t in tensors)

    @property
    def on_device(self) -> bool:
        return self.storage == self.device

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for chunk in self.sampler:
            index = torch.as_tensor(chunk, device=self.storage)
            batch = tuple(t.index_select(0, index) for t in self.tensors)
            yield batch if self.on_device else tuple(b.to(self.device) for b in batch)


def device_batches(tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool, seed: int,
                   device: torch.device) -> tuple[DeviceBatches, ShardBatches]:
    """``DeviceBatches`` of this worker's shard, and the sampler (``set_epoch`` it every epoch)."""
    sampler = shard_sampler(len(tensors[0]), batch_size, shuffle, seed)
    return DeviceBatches(tensors, sampler, device), sampler


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every worker: what its checkpoint
    holds. DDP copies them at each training forward, then each worker's own batch moves them."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def gather_rng(generator: torch.Generator | None = None) -> list[dict]:
    """Every worker's RNG states (torch's, CUDA's where used, and ``generator``), by rank, for
    the checkpoint rank 0 writes; one element on a single worker."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state() if generator is not None else None,
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng(resume: dict, rank: int, generator: torch.Generator | None = None) -> None:
    """This worker's RNG states from a resume state (``gather_rng``); rank 0's where the run had
    fewer workers before."""
    states = resume.get("rng") or [{}]
    mine = states[rank] if rank < len(states) else states[0]
    if mine.get("torch") is not None:
        torch.set_rng_state(mine["torch"])
    if generator is not None and mine.get("generator") is not None:
        generator.set_state(mine["generator"])
    if mine.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
