"""Benchmark workflows: the scoring pipeline (``cxr.workflows.score``) and the naive
per-image loop (``cxr.benchmark.naive_score``) on the same registered models and images."""

from __future__ import annotations

import json
import logging
import os
import platform as host
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from cxr import tracking
from cxr.benchmark import PeakMemory, naive_score, phases, timed
from cxr.config import BenchmarkConfig, PlatformConfig, ScoreConfig, TrainBenchmarkConfig, config_to_dict
from cxr.data.manifest import read_manifest
from cxr.data.storage import absolute_uri, is_s3, list_files
from cxr.scores_table import read_scores
from cxr.model_input import Preprocess
from cxr.workflows.score import plan_scoring, resolve_models, run_scoring

log = logging.getLogger(__name__)


def machine() -> str:
    """The host, its CPUs, its GPU and torch, for a benchmark record."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{host.node()}: {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def distinct_inputs(uris: list[str], n: int, folder: Path) -> list[str]:
    """``n`` inputs with distinct URIs. Where there are fewer files than ``n``, local files are
    repeated as symbolic links under ``folder``: ``cxr score`` scores each URI once, so
    repeating a URI would not repeat the work. S3 inputs cannot be linked: the benchmark then
    uses each once."""
    if n <= len(uris):
        return uris[:n]
    if any(is_s3(u) for u in uris):
        log.warning("%d S3 inputs cannot be repeated to %d: benchmarking on %d", len(uris), n, len(uris))
        return uris
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder = folder.resolve()
    links = []
    for i in range(n):
        target = Path(uris[i % len(uris)]).resolve()
        link = folder / f"{i:08d}{target.suffix}"
        link.symlink_to(target)
        links.append(str(link))
    return links


def benchmark_inputs(cfg: BenchmarkConfig, platform: PlatformConfig) -> list[str]:
    """The benchmark's images (``cfg.images`` distinct URIs), written as OUT/inputs.parquet."""
    source = absolute_uri(cfg.input)
    uris = (read_manifest(source, platform.storage)["uri"].tolist() if source.endswith(".parquet")
            else list_files(source, platform.storage))
    if not uris:
        raise ValueError(f"no images in {cfg.input}")
    out = Path(cfg.out)
    shutil.rmtree(out / "scores", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    uris = distinct_inputs(uris, cfg.images, out / "inputs")
    pd.DataFrame({"uri": uris}).to_parquet(out / "inputs.parquet")
    return uris


def benchmark_pipeline(cfg: BenchmarkConfig, platform: PlatformConfig, start_ray: Callable[[], None]) -> dict:
    """``cxr score`` on OUT/inputs.parquet into OUT/scores: images/s end to end, peak memory,
    start-up and steady state. ``start_ray`` (the entry point's, as ``cxr score`` runs it) is
    called inside the timed span, so the figure is what a nightly job takes."""
    scratch = Path(cfg.out) / "scores"
    score_cfg = ScoreConfig(
        input=str(Path(cfg.out) / "inputs.parquet"), output=str(scratch), segmenter=cfg.segmenter,
        classifier=cfg.classifier, batch_size=cfg.batch_size, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
        torch_threads=cfg.torch_threads, decode_tasks=cfg.decode_tasks, use_gpu=cfg.use_gpu,
        gpus_per_actor=cfg.gpus_per_actor, cpu_bf16=cfg.cpu_bf16, object_store_mb=cfg.object_store_mb)
    with PeakMemory() as memory:
        def score() -> dict:
            plan = plan_scoring(score_cfg, platform)
            start_ray()
            return run_scoring(plan)

        summary, seconds = timed(score)
    return {"images_per_s": summary["scored"] / seconds, "seconds": seconds, "scored": summary["scored"],
            "peak_memory_gib": memory.peak_bytes / 2**30, "by_status": summary["by_status"],
            **phases(summary["started_at"], read_scores(str(scratch), columns=["scored_at"])
                     .column("scored_at").to_pandas())}


def benchmark_naive(cfg: BenchmarkConfig, platform: PlatformConfig, uris: list[str]) -> tuple[dict, dict]:
    """(the naive loop's figures, the models it ran) on ``uris``, with the pipeline's models and
    preprocessing. Run it without Ray beside it, so its peak memory is its own."""
    uri = platform.tracking_uri
    classifier_ref, card, segmenter_ref, _ = resolve_models(uri, cfg.classifier, cfg.segmenter)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    classifier = tracking.load_registered(uri, classifier_ref.pinned_uri, device)
    segmenter = tracking.load_registered(uri, segmenter_ref.pinned_uri, device) if segmenter_ref else None
    models = {"classifier": f"{classifier_ref.pinned_uri} ({card.architecture} @ {card.preprocessing.letterbox_size} px, "
                            f"lung mask {card.preprocessing.lung_mask})",
              "segmenter": (f"{segmenter_ref.pinned_uri} ({segmenter.card.architecture} @ "
                            f"{segmenter.card.preprocessing.letterbox_size} px)") if segmenter else None}
    torch.set_num_threads(os.cpu_count() or 1)
    with PeakMemory() as memory:
        done, seconds = timed(naive_score, uris, Preprocess(card.preprocessing, segmenter), classifier.model,
                              platform.storage, device)
    return {"images_per_s": done / seconds, "seconds": seconds, "scored": done,
            "peak_memory_gib": memory.peak_bytes / 2**30}, models


def benchmark_record(cfg: BenchmarkConfig, uris: list[str]) -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "images": len(uris), "config": cfg.__dict__}


def benchmark_training(cfg: TrainBenchmarkConfig) -> dict:
    """The classifier's training step timed in parts (``cxr.train.throughput``) in one Ray
    Train worker (Ray must be up); writes and returns OUT/benchmark_train.json's record."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxr.train.throughput import RESULTS, throughput_loop_per_worker

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = (out / "ray").resolve()
    # A fresh run name each time: Ray Train would resume a run of the same name.
    name = "benchmark-train-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    result = TorchTrainer(
        throughput_loop_per_worker, train_loop_config=config_to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage))).fit()
    with result.checkpoint.as_directory() as folder:
        rates = json.loads((Path(folder) / RESULTS).read_text())
    shutil.rmtree(storage / name, ignore_errors=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "config": config_to_dict(cfg), "images_per_s": rates}
    (out / "benchmark_train.json").write_text(json.dumps(record, indent=2))
    return record
