"""Benchmark pieces: the naive per-image baseline the pipeline is compared with, and a peak
memory sampler over a process tree (the driver, and the Ray processes it started)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pandas as pd

import psutil
import torch
from torch import nn

from cxr.data.decode import DecodeLimits, decode_image
from cxr.data.errors import BadImageError
from cxr.data.storage import StorageConfig, read_bytes
from cxr.models.classifier import logits_and_features
from cxr.model_input import Preprocess


def naive_score(uris: list[str], preprocess: Preprocess, classifier: nn.Module,
                storage: StorageConfig | None = None, device: str = "cpu") -> int:
    """What a first version would do: one image at a time, fp32, decode -> the card's
    preprocessing (segment, mask) -> classify -> Grad-CAM by a backward pass to layer4, on
    ``device`` (where ``preprocess``'s segmenter and ``classifier`` are). Returns the images scored."""
    limits, done = DecodeLimits(), 0
    classifier = classifier.to(device).eval()
    for uri in uris:
        try:
            gray = decode_image(read_bytes(uri, storage, limits.max_bytes), uri, limits)
        except BadImageError:
            continue
        image, small = preprocess.letterbox(gray)
        x, _ = preprocess(torch.from_numpy(image)[None, None].to(device),
                          torch.from_numpy(small)[None, None].to(device) if small is not None else None)
        logits, features = logits_and_features(classifier, x)
        features.retain_grad()
        target = int(logits.argmax(1))
        logits[0, target].backward()
        weights = features.grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features).sum(1))
        cam = nn.functional.interpolate(cam[:, None], size=(64, 64), mode="bilinear")
        classifier.zero_grad(set_to_none=True)
        done += int(cam.cpu().numel() > 0)     # .cpu(): wait for the GPU, as a real loop would
    return done


class PeakMemory:
    """Samples the proportional set size (PSS: shared pages counted once across processes) of
    this process and all its descendants; ``peak_bytes`` is the largest total seen."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._total())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def phases(started_at: datetime, scored_at: pd.Series) -> dict:
    """Start-up and steady state of a scoring run, from its rows' ``scored_at`` stamps (the
    moment an actor finished a batch; one stamp per batch).

    ``startup_s``: from the job's start to the first scored batch (Ray, the model actors'
    imports and model loading, the first decoded batch). ``steady_images_per_s``: the rows
    scored after the first batch, over the time from the first batch to the last one.
    """
    stamps = pd.to_datetime(scored_at, utc=True).dropna().sort_values()
    if stamps.empty:
        return {"startup_s": None, "steady_seconds": None, "steady_images_per_s": None}
    first, last = stamps.iloc[0], stamps.iloc[-1]
    steady_s = (last - first).total_seconds()
    return {"startup_s": (first - pd.Timestamp(started_at)).total_seconds(), "steady_seconds": steady_s,
            "steady_images_per_s": int((stamps > first).sum()) / steady_s if steady_s > 0 else None}


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started
