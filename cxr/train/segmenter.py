"""The segmenter's ``train_loop_per_worker``: Dice + BCE, augmentation, best-val-Dice checkpoints.

A plain function of its config; the same code runs on 2 CPU workers in tests and on N GPUs.
"""

from __future__ import annotations

import logging
import time

import ray.train
import ray.train.torch
import segmentation_models_pytorch as smp
import torch
from torch import nn

from cxr import tracking
from cxr.config import PlatformConfig, SegmenterTrainConfig
from cxr.data.manifest import read_manifest
from cxr.metrics import dice_per_image
from cxr.models import build_model
from cxr.train.checkpoints import load_resume, unwrap
from cxr.train.common import all_reduce_sum, autocast, gather_rng, report, restore_rng, shard_loader, sync_buffers
from cxr.train.segmentation_data import SegmentationDataset

log = logging.getLogger(__name__)


def split_rows(cfg: SegmenterTrainConfig, platform: PlatformConfig, split: str):
    rows = read_manifest(cfg.manifest, platform.storage)
    rows = rows[rows["split"] == split]
    if split == "train" and cfg.max_train_images:
        rows = rows.sample(n=min(cfg.max_train_images, len(rows)), random_state=cfg.seed)
    return rows


def train_loop_per_worker(config: dict) -> None:
    """``config``: {"cfg": SegmenterTrainConfig fields, "platform": PlatformConfig, "run_id": MLflow run}."""
    cfg = SegmenterTrainConfig(**config["cfg"])
    platform: PlatformConfig = config["platform"]
    run_id: str | None = config.get("run_id")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()

    train_ds = SegmentationDataset(split_rows(cfg, platform, "train"), cfg.image_size, augment=True, storage=platform.storage)
    val_ds = SegmentationDataset(split_rows(cfg, platform, "val"), cfg.image_size, augment=False, storage=platform.storage)
    train_loader, train_order = shard_loader(train_ds, cfg.batch_size, True, cfg.seed, num_workers=cfg.loader_workers,
                                             persistent_workers=cfg.loader_workers > 0)
    val_loader, _ = shard_loader(val_ds, cfg.batch_size, False, cfg.seed)

    bare = build_model(cfg.model)
    resume = load_resume(ray.train.get_checkpoint())       # a rerun after a kill, or a retried worker
    if resume is not None:
        bare.load_state_dict(resume.pop("weights"))
        restore_rng(resume, rank)
    model = ray.train.torch.prepare_model(bare)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    dice_loss, bce = smp.losses.DiceLoss("binary", from_logits=True), nn.BCEWithLogitsLoss()
    best_dice = resume["best_dice"] if resume else -1.0
    # Epochs an earlier attempt logged past the checkpoint it resumes from are redone, not logged twice.
    logged = tracking.logged_steps(platform.tracking_uri, run_id, "val_dice") if rank == 0 else set()

    for epoch in range(resume["next_epoch"] if resume else 0, cfg.epochs):
        started = time.perf_counter()
        train_order.set_epoch(epoch)
        lr = scheduler.get_last_lr()[0]                 # the rate this epoch trains at
        model.train()
        # Sums stay on the device (as in the classifier loop): a .item() per step would stall the GPU.
        loss_sum, n_seen = torch.zeros((), device=device), 0
        for images, masks in train_loader:
            with autocast(device):
                logits = model(images)
                loss = dice_loss(logits, masks) + bce(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(images)
            n_seen += len(images)
        scheduler.step()

        model.eval()
        sync_buffers(model)         # every worker validates rank 0's model: the checkpoint's BatchNorm statistics
        val_loss_sum, dice_sum, n_val = torch.zeros((), device=device), torch.zeros((), device=device), 0
        with torch.no_grad():
            for images, masks in val_loader:
                with autocast(device):
                    logits = unwrap(model)(images)      # no DDP: the shards differ in size
                val_loss_sum += (dice_loss(logits.float(), masks) + bce(logits.float(), masks)) * len(images)
                dice_sum += dice_per_image((logits.float() > 0).float(), masks).sum()
                n_val += len(images)
        loss_sum, val_loss_sum, dice_sum = loss_sum.item(), val_loss_sum.item(), dice_sum.item()
        loss_sum, n_seen, val_loss_sum, dice_sum, n_val = all_reduce_sum(
            [loss_sum, n_seen, val_loss_sum, dice_sum, n_val], device)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": loss_sum / n_seen, "val_loss": val_loss_sum / n_val,
                   "val_dice": dice_sum / n_val, "n_train": n_seen, "n_val": n_val, "lr": lr,
                   "epoch_seconds": seconds, "train_images_per_s": n_seen / seconds}
        best_dice = max(best_dice, metrics["val_dice"])
        if rank == 0:       # before the checkpoint (no epoch missing after a kill), each epoch once
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
            if run_id and epoch not in logged:
                tracking.log_metrics(platform.tracking_uri, run_id, metrics, step=epoch)
        # Every epoch is a checkpoint, to resume from (Ray keeps the best by val_dice and the latest).
        report(metrics, model, {"model": cfg.model, "image_size": cfg.image_size, "epoch": epoch,
                                "val_dice": metrics["val_dice"]}, save=True,
               resume={"next_epoch": epoch + 1, "best_dice": best_dice, "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": gather_rng()})
