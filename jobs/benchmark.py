"""``cxr benchmark``: the scoring pipeline (Ray Data, batched, forward-only Grad-CAM) against a
naive sequential loop on the same registered models and images. Prints images/s of both, the
ratio, peak memory and the pipeline's start-up and steady state, and writes them to
OUT/benchmark.json."""

from __future__ import annotations

import json
import logging
import os
import platform as host
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from cxr import tracking
from cxr.benchmark import PeakMemory, naive_score, phases, timed
from cxr.config import BenchmarkConfig, ScoreConfig, load_platform
from cxr.data.manifest import read_manifest
from cxr.data.storage import absolute_uri, is_s3, list_files
from cxr.scoring import read_scores

log = logging.getLogger("cxr.jobs.benchmark")


def main(cfg: BenchmarkConfig) -> int:
    import ray

    from jobs import score

    platform = load_platform()
    source = absolute_uri(cfg.input)
    uris = (read_manifest(source, platform.storage)["uri"].tolist() if source.endswith(".parquet")
            else list_files(source, platform.storage))
    if not uris:
        print(f"cxr benchmark: no images in {cfg.input}", file=sys.stderr)
        return 1
    out = Path(cfg.out)
    scratch = out / "scores"
    shutil.rmtree(scratch, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    uris = distinct_inputs(uris, cfg.images, out / "inputs")
    manifest = out / "inputs.parquet"
    pd.DataFrame({"uri": uris}).to_parquet(manifest)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "images": len(uris), "config": cfg.__dict__}

    own_ray = not ray.is_initialized()      # else a caller's Ray (a test's), left running
    with PeakMemory() as memory:
        summary, seconds = timed(score.run, ScoreConfig(
            input=str(manifest), output=str(scratch), segmenter=cfg.segmenter, classifier=cfg.classifier,
            batch_size=cfg.batch_size, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
            torch_threads=cfg.torch_threads,
            decode_tasks=cfg.decode_tasks, use_gpu=cfg.use_gpu, gpus_per_actor=cfg.gpus_per_actor,
            cpu_bf16=cfg.cpu_bf16, object_store_mb=cfg.object_store_mb))
    result["pipeline"] = {"images_per_s": summary["scored"] / seconds, "seconds": seconds, "scored": summary["scored"],
                          "peak_memory_gib": memory.peak_bytes / 2**30, "by_status": summary["by_status"],
                          **phases(summary["started_at"], read_scores(str(scratch), columns=["scored_at"])
                                   .column("scored_at").to_pandas())}

    if own_ray:
        # The naive loop runs alone, as a first version would: no Ray processes beside it
        # (GCS, raylet, idle workers), and its peak memory is its own (1.3 GiB here, not 3.6).
        ray.shutdown()
    naive_uris = uris[:len(uris) if cfg.naive_images is None else cfg.naive_images]
    segmenter, seg_card, _ = tracking.load_registered(platform.tracking_uri, cfg.segmenter)
    classifier, cls_card, _ = tracking.load_registered(platform.tracking_uri, cfg.classifier)
    result["models"] = {"segmenter": f"{cfg.segmenter} ({seg_card['architecture']} @ {seg_card['input']['shape'][-1]} px)",
                        "classifier": f"{cfg.classifier} ({cls_card['architecture']} @ "
                                      f"{cls_card['preprocessing']['letterbox_size']} px)"}
    if naive_uris:
        torch.set_num_threads(os.cpu_count() or 1)
        with PeakMemory() as memory:
            done, seconds = timed(naive_score, naive_uris, segmenter, int(seg_card["input"]["shape"][-1]), classifier,
                                  int(cls_card["preprocessing"]["letterbox_size"]),
                                  int(cls_card["preprocessing"].get("dilation_px", 3)), platform.storage,
                                  "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        result["naive"] = {"images_per_s": done / seconds, "seconds": seconds, "scored": done,
                           "peak_memory_gib": memory.peak_bytes / 2**30}
        result["speedup"] = result["pipeline"]["images_per_s"] / result["naive"]["images_per_s"]
    (out / "benchmark.json").write_text(json.dumps(result, indent=2, default=str))
    p = result["pipeline"]
    line = (f"benchmark on {len(uris)} images ({result['machine']}): pipeline {p['images_per_s']:.2f} images/s "
            f"end to end, peak {p['peak_memory_gib']:.2f} GiB")
    if p["steady_images_per_s"]:
        line += (f" (start-up to the first scored batch {p['startup_s']:.1f} s, then "
                 f"{p['steady_images_per_s']:.2f} images/s)")
    if "naive" in result:
        n = result["naive"]
        line += (f"; naive loop {n['images_per_s']:.2f} images/s on {n['scored']}, peak {n['peak_memory_gib']:.2f} GiB; "
                 f"speed-up {result['speedup']:.2f}x")
    print(f"{line}; wrote {out / 'benchmark.json'}")
    return 0


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


def machine() -> str:
    """The host, its CPUs, its GPU and torch, for a benchmark record."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{host.node()}: {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["benchmark", *sys.argv[1:]]))
