"""The classifier's training step timed in parts, inside a Ray Train worker as in ``cxr
pretrain``, to show where a pretraining epoch's time goes:

- ``step``: the optimiser step alone, on one batch already on the device;
- ``step_augment``: the same with the on-device augmentation;
- ``loader_augment_step``: what ``cxr pretrain`` does per step (uint8 batches from host memory
  through Ray Train's loader, augmentation, step);
- ``compiled_step_augment`` (optional): ``step_augment`` with the model under ``torch.compile``.

Each is images/s over ``steps`` steps after ``warmup_steps``, synchronised with the device only
at the ends of the timed window. Images are synthetic: the step's cost does not depend on them.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from cxr.models import build_model
from cxr.train.classifier import class_weights, make_batches, train_step

CLASSES = 3   # the source task's
RESULTS = "throughput.json"


def throughput_loop_per_worker(config: dict) -> None:
    """``config``: {"model", "image_size", "batch_size", "steps", "warmup_steps", "compile"}."""
    b, steps, warmup = config["batch_size"], config["steps"], config["warmup_steps"]
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda       # as the training loop
    torch.manual_seed(0)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(config["model"], num_classes=CLASSES).to(memory_format=memory_format)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    n = b * (warmup + steps)
    images = rng.integers(0, 256, (n, 1, config["image_size"], config["image_size"]), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    weights = np.ones(n, dtype=np.float32)
    criterion = nn.CrossEntropyLoss(weight=class_weights(labels, CLASSES).to(device), reduction="none")
    generator = torch.Generator(device=device).manual_seed(0)
    one_batch = (torch.from_numpy(images[:b]).to(device), torch.from_numpy(labels[:b]).to(device),
                 torch.from_numpy(weights[:b]).to(device))

    def images_per_s(net: nn.Module, batches, augment: bool) -> float:
        net.train()
        for i, (x, y, w) in enumerate(batches):
            if i == warmup:
                _sync(device)
                started = time.perf_counter()
            train_step(net, criterion, optimizer, x, y, w, device, memory_format, generator if augment else None)
        _sync(device)
        return steps * b / (time.perf_counter() - started)

    repeated = lambda: itertools.repeat(one_batch, warmup + steps)   # noqa: E731
    results = {"step": images_per_s(model, repeated(), augment=False),
               "step_augment": images_per_s(model, repeated(), augment=True),
               "loader_augment_step": images_per_s(
                   model, make_batches(images, labels, weights, b, shuffle=True, device=device)[0], augment=True)}
    if config.get("compile"):
        try:
            results["compiled_step_augment"] = images_per_s(torch.compile(model), repeated(), augment=True)
        except Exception as e:  # a measurement, not a dependency: record why it did not run
            results["compile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    # In a checkpoint: Ray Train V2 keeps reported metrics only with one.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / RESULTS).write_text(json.dumps(results))
        ray.train.report(results, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
