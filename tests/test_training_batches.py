"""What a training step costs beyond the model: the split is gathered on the training device
(``cxr.train.common.DeviceBatches``: every image once an epoch across workers, in the order the
seed and epoch fix), and a head-only stage runs no backward pass through the frozen backbone."""

import numpy as np
import torch
from torch import nn

from cxr.models import build_model
from cxr.models.classifier import set_trainable
from cxr.train.classifier import train_step
from cxr.train.common import DeviceBatches, ShardBatches


def _split(n=37):
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.integers(0, 256, (n, 1, 16, 16), dtype=np.uint8)),
            torch.from_numpy(rng.integers(0, 4, n)), torch.ones(n))


def test_device_batches_cover_the_split_once_an_epoch_across_workers_in_the_seeded_order():
    images, labels, weights = _split()
    seen = []
    for rank in range(3):
        sampler = ShardBatches(len(images), 5, rank, 3, shuffle=True, seed=4)
        batches = DeviceBatches((images, labels, weights), sampler, torch.device("cpu"))
        assert batches.on_device and len(batches) == len(sampler)
        stored = batches.tensors[0].data_ptr()
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            for (x, y, w), index in zip(batches, iter(sampler)):
                assert torch.equal(x, images[index]) and torch.equal(y, labels[index]) and x.dtype == torch.uint8
                if epoch == 1:
                    seen += index
        assert batches.tensors[0].data_ptr() == stored       # moved once: the same storage every epoch
    assert sorted(seen) == list(range(len(images)))


def test_a_head_only_stage_runs_no_backward_through_the_backbone():
    torch.manual_seed(0)
    model = build_model("resnet18-tiny", num_classes=4, dropout=0.0)
    set_trainable(model, ["fc"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, labels, weights = _split(8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    calls = []
    # Every convolution's backward would go through this hook; none may run.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_full_backward_hook(lambda *_: calls.append(1))
    train_step(model.train(), nn.CrossEntropyLoss(reduction="none"), optimizer, images, labels, weights,
               torch.device("cpu"), torch.contiguous_format, None)
    assert calls == []
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("fc") for n in changed)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc"))
