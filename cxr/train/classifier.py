"""The classifier's ``train_loop_per_worker``, for pretraining and fine-tuning alike.

Training runs in stages (``ClassifierTrainConfig.stages``): each sets which top-level modules
train, a fresh Adam optimiser and a step decay. Images arrive as uint8 tensors from the object
store; augmentation and normalisation run batch-wise on the training device, so the CPU side
only slices tensors. Every epoch reports a checkpoint with what it takes to resume (optimiser,
scheduler, RNG states); Ray keeps the one with the lowest validation loss and the latest, and
hands the latest back to a rerun or a retried worker (``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from cxr import tracking
from cxr.config import ClassifierTrainConfig, PlatformConfig, config_fields
from cxr.data.augment import classifier_augment_batch, photometric_augment_batch
from cxr.models import build_model
from cxr.models.classifier import freeze_batchnorm, load_matching, set_trainable
from cxr.preprocess import classifier_input
from cxr.train.checkpoints import load_resume, unwrap
from cxr.train.common import (all_reduce_sum, autocast, device_batches, gather_rng, report, restore_rng,
                              sync_buffers)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    epochs: int
    lr: float
    trainable: tuple[str, ...]


def stages(cfg: ClassifierTrainConfig) -> list[Stage]:
    out = [Stage(cfg.stage1_epochs, cfg.stage1_lr, cfg.stage1_trainable)]
    if cfg.stage2_epochs > 0:
        out.append(Stage(cfg.stage2_epochs, cfg.stage2_lr, cfg.stage2_trainable))
    return [s for s in out if s.epochs > 0]


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """``w_i = N / (C * n_i)`` (the paper); a class with no example gets weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def model_meta(cfg: ClassifierTrainConfig) -> dict:
    """What a checkpoint needs to rebuild and use the model."""
    return {"model": cfg.model, "model_kwargs": {"num_classes": len(cfg.classes), "dropout": cfg.dropout},
            "classes": list(cfg.classes), "image_size": cfg.image_size}


def make_batches(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, batch_size: int, shuffle: bool,
                 device: torch.device, seed: int = 0):
    """(batches, sampler) of this worker's shard (``ShardBatches``: every image once an epoch
    across workers), the split held on the training device as uint8 (``DeviceBatches``)."""
    with warnings.catch_warnings():
        # The arrays are zero-copy views of Ray's object store, hence read-only; they are copied
        # to the device (or gathered into new tensors), never written.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        tensors = (torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(weights))
    return device_batches(tensors, batch_size, shuffle, seed, device)


def weighted_loss(criterion: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The batch's cross entropy with per-image ``weights`` (all ones unless archive-balanced):
    sum(w_i * l_i) / sum(w_i * c_i), where ``criterion`` (reduction "none") may carry class
    weights c; with all w_i equal this is exactly ``nn.CrossEntropyLoss``'s weighted mean."""
    class_w = criterion.weight[labels] if criterion.weight is not None else torch.ones_like(weights)
    return (criterion(logits, labels) * weights).sum() / (class_w * weights).sum()


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, weights: torch.Tensor, device: torch.device, memory_format: torch.memory_format,
               augment_generator: torch.Generator | None, photometric: bool = False) -> torch.Tensor:
    """One optimiser step on a batch of (B, 1, H, W) uint8 images already on ``device``;
    augmented when a generator is given (style too with ``photometric``). Returns the detached
    loss, left on the device."""
    x = images.float()
    if augment_generator is not None:
        x = classifier_augment_batch(x, generator=augment_generator)
        if photometric:
            x = photometric_augment_batch(x, generator=augment_generator)
    x = classifier_input(x).contiguous(memory_format=memory_format)
    with autocast(device):
        loss = weighted_loss(criterion, model(x).float(), labels, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_loop_per_worker(config: dict) -> None:
    """``config``: {"cfg": config fields, "platform": PlatformConfig, "run_id": MLflow run or None,
    "data": ObjectRef of {"train": (images, labels, weights), "val": (images, labels, weights)},
    "init_state": ObjectRef of a state_dict or None}."""
    names = {f.name for f in config_fields(ClassifierTrainConfig)}
    cfg = ClassifierTrainConfig(**{k: v for k, v in config["cfg"].items() if k in names})
    platform: PlatformConfig = config["platform"]
    run_id: str | None = config.get("run_id")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)   # augmentation draws on the device
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda       # fixed input size: let cuDNN pick its fastest kernels
    data = ray.get(config["data"])
    train_loader, train_order = make_batches(*data["train"], cfg.batch_size, shuffle=True, device=device,
                                             seed=cfg.seed)
    val_loader, _ = make_batches(*data["val"], cfg.batch_size, shuffle=False, device=device)

    model = build_model(cfg.model, num_classes=len(cfg.classes), dropout=cfg.dropout)
    resume = load_resume(ray.train.get_checkpoint())
    if resume is not None:      # a rerun after a kill, or a worker retried: the last epoch's state
        model.load_state_dict(resume.pop("weights"))
        restore_rng(resume, rank, generator)
        if rank == 0:
            log.info("resuming at epoch %d (stage %d)", resume["next_epoch"], resume["stage"] + 1)
    elif config.get("init_state") is not None:
        load_matching(model, ray.get(config["init_state"]), "initial weights")
    # A run the time limit stopped stays stopped; otherwise it continues at the epoch after the checkpoint.
    start_epoch = (sum(s.epochs for s in stages(cfg)) if resume.get("stopped") else resume["next_epoch"]) \
        if resume else 0
    # Epochs an earlier attempt logged past the checkpoint it resumes from are redone, not logged twice.
    logged = tracking.logged_steps(platform.tracking_uri, run_id, "val_loss") if rank == 0 else set()
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    weights = class_weights(data["train"][1], len(cfg.classes)) if cfg.class_weighted else None
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None, reduction="none")
    meta = model_meta(cfg)
    best_val_loss = resume["best_val_loss"] if resume else float("inf")
    epoch, out_of_time = 0, False
    # The time limit counts the training time of earlier attempts too.
    loop_started = time.perf_counter() - (resume.get("elapsed_s", 0.0) if resume else 0.0)

    for stage_index, stage in enumerate(stages(cfg)):
        if out_of_time:
            break
        if epoch + stage.epochs <= start_epoch:         # a stage finished before the interruption
            epoch += stage.epochs
            continue
        bare = unwrap(model)
        set_trainable(bare, stage.trainable)
        # A fresh DDP wrapper per stage: DDP fixes the set of trained parameters when it is built.
        model = ray.train.torch.prepare_model(bare)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
        if resume is not None and resume["stage"] == stage_index and start_epoch > epoch:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        for _ in range(stage.epochs):
            if out_of_time:
                break
            if epoch < start_epoch:
                epoch += 1
                continue
            started = time.perf_counter()
            train_order.set_epoch(epoch)
            lr = scheduler.get_last_lr()[0]             # the rate this epoch trains at
            model.train()
            freeze_batchnorm(model)
            # Sums stay on the device: a .item() per step would stall the GPU once a step.
            loss_sum, n_seen = torch.zeros((), device=device), 0
            for images, labels, image_weights in train_loader:
                loss = train_step(model, criterion, optimizer, images, labels, image_weights, device, memory_format,
                                  generator if cfg.augment else None, cfg.photometric)
                loss_sum += loss * len(labels)
                n_seen += len(labels)
            scheduler.step()
            loss_sum = loss_sum.item()                  # waits for the epoch's last step
            train_seconds = time.perf_counter() - started

            model.eval()
            sync_buffers(model)     # every worker validates rank 0's model: the checkpoint's BatchNorm statistics
            # The split's weighted mean loss, sum(w c l) / sum(w c) over all its images: one figure
            # whatever the batches or the number of workers (a mean of batch means is not).
            val_num, val_den = torch.zeros((), device=device), torch.zeros((), device=device)
            correct, n_val = torch.zeros((), device=device), 0
            with torch.no_grad():
                for images, labels, image_weights in val_loader:
                    x = classifier_input(images).contiguous(memory_format=memory_format)
                    with autocast(device):
                        logits = unwrap(model)(x).float()     # no DDP: the shards differ in size
                    class_w = criterion.weight[labels] if criterion.weight is not None else torch.ones_like(image_weights)
                    val_num += (criterion(logits, labels) * image_weights).sum()
                    val_den += (class_w * image_weights).sum()
                    correct += (logits.argmax(1) == labels).sum()
                    n_val += len(labels)
            val_num, val_den, correct = val_num.item(), val_den.item(), correct.item()
            loss_sum, n_seen, val_num, val_den, correct, n_val = all_reduce_sum(
                [loss_sum, n_seen, val_num, val_den, correct, n_val], device)
            metrics = {"epoch": epoch, "stage": stage_index + 1, "train_loss": loss_sum / n_seen,
                       "val_loss": val_num / val_den, "val_accuracy": correct / n_val,
                       "n_train": n_seen, "n_val": n_val, "lr": lr, "epoch_seconds": time.perf_counter() - started,
                       "train_images_per_s": n_seen / train_seconds}
            best_val_loss = min(best_val_loss, metrics["val_loss"])
            metrics["best_val_loss"] = best_val_loss      # what a fine-tune keeps, and what a tuning trial is judged by
            if cfg.time_limit_s is not None:
                # Every worker must stop after the same epoch: any worker past the limit stops all.
                late = float(time.perf_counter() - loop_started > cfg.time_limit_s)
                out_of_time = all_reduce_sum([late], device)[0] > 0
                if out_of_time and rank == 0:
                    log.info("time limit %.0f s reached after epoch %d: stopping", cfg.time_limit_s, epoch)
            if rank == 0:       # before the checkpoint (no epoch missing after a kill), each epoch once
                log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
                if run_id and epoch not in logged:
                    tracking.log_metrics(platform.tracking_uri, run_id, metrics, step=epoch)
            # Every epoch is a checkpoint, to resume from (Ray keeps the best by val_loss and the latest).
            state = {"next_epoch": epoch + 1, "stage": stage_index, "best_val_loss": best_val_loss,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": gather_rng(generator), "elapsed_s": time.perf_counter() - loop_started,
                     "stopped": bool(out_of_time)}
            report(metrics, model, {**meta, "epoch": epoch, "val_loss": metrics["val_loss"],
                                    "val_accuracy": metrics["val_accuracy"]}, save=True, resume=state)
            epoch += 1
