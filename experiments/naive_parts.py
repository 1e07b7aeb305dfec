"""Where the naive loop of ``cxr benchmark`` spends an image: the segmenter's forward pass and
the classifier's forward + backward (Grad-CAM by backprop), each timed alone on CPU at batch 1.

The models are built untrained (the cost of a forward pass does not depend on the weights), so
it needs no registry. Usage: ``python -m experiments.naive_parts [--threads 2] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from cxr.models import build_model, model_spec
from cxr.models.classifier import logits_and_features


def per_call_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the benchmark's naive loop: all CPUs)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per part")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    segmenter, classifier = build_model("unet-resnet34").eval(), build_model("resnet50", num_classes=4).eval()
    seg_size, cls_size = model_spec("unet-resnet34").input_size, model_spec("resnet50").input_size
    seg_x, cls_x = torch.rand(1, 1, seg_size, seg_size), torch.rand(1, 3, cls_size, cls_size)

    def segment() -> None:
        with torch.no_grad():
            segmenter(seg_x)

    def classify_and_backprop() -> None:      # what naive_score does for its Grad-CAM
        logits, features = logits_and_features(classifier, cls_x)
        features.retain_grad()
        logits[0, 0].backward()
        classifier.zero_grad(set_to_none=True)

    def classify() -> None:
        with torch.no_grad():
            classifier(cls_x)

    seg_ms, cam_ms, fwd_ms = (per_call_ms(f, args.repeats) for f in (segment, classify_and_backprop, classify))
    print(f"{args.threads} threads, batch 1, fp32: segmenter forward {seg_ms:.0f} ms; classifier forward "
          f"{fwd_ms:.0f} ms, forward + backward {cam_ms:.0f} ms. Models only: {1e3 / (seg_ms + cam_ms):.2f} "
          f"images/s with the segmenter, {1e3 / cam_ms:.2f} without")


if __name__ == "__main__":
    main()
