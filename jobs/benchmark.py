"""``cxr benchmark``: the scoring pipeline (Ray Data, batched, forward-only Grad-CAM) against a
naive sequential loop on the same registered models and images. Prints images/s of both, the
ratio, peak memory and the pipeline's start-up and steady state, and writes them to
OUT/benchmark.json (``cxr.workflows.benchmark``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cxr.config import BenchmarkConfig, load_platform
from cxr.workflows.benchmark import benchmark_inputs, benchmark_naive, benchmark_pipeline, benchmark_record
from jobs.runtime import init_ray


def main(cfg: BenchmarkConfig) -> int:
    import ray

    platform = load_platform()
    try:
        uris = benchmark_inputs(cfg, platform)
    except ValueError as e:
        print(f"cxr benchmark: {e}", file=sys.stderr)
        return 1
    result = benchmark_record(cfg, uris)
    own_ray = not ray.is_initialized()      # else a caller's Ray (a test's), left running
    result["pipeline"] = p = benchmark_pipeline(cfg, platform, init_ray)
    if own_ray:
        # The naive loop runs alone, as a first version would: no Ray processes beside it
        # (GCS, raylet, idle workers), and its peak memory is its own (1.3 GiB here, not 3.6).
        ray.shutdown()
    naive_uris = uris[:len(uris) if cfg.naive_images is None else cfg.naive_images]
    if naive_uris:
        result["naive"], result["models"] = benchmark_naive(cfg, platform, naive_uris)
        result["speedup"] = p["images_per_s"] / result["naive"]["images_per_s"]
    out = Path(cfg.out) / "benchmark.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    line = (f"benchmark on {len(uris)} images ({result['machine']}): pipeline {p['images_per_s']:.2f} images/s "
            f"end to end, peak {p['peak_memory_gib']:.2f} GiB")
    if p["steady_images_per_s"]:
        line += (f" (start-up to the first scored batch {p['startup_s']:.1f} s, then "
                 f"{p['steady_images_per_s']:.2f} images/s)")
    if "naive" in result:
        n = result["naive"]
        line += (f"; naive loop {n['images_per_s']:.2f} images/s on {n['scored']}, peak {n['peak_memory_gib']:.2f} GiB; "
                 f"speed-up {result['speedup']:.2f}x")
    print(f"{line}; wrote {out}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["benchmark", *sys.argv[1:]]))
