"""``cxr benchmark-train``: the classifier's training step timed in parts (``cxr.train.throughput``)
in one Ray Train worker, as ``cxr pretrain`` runs it. Prints images/s of each part and writes
them to OUT/benchmark_train.json (``cxr.workflows.benchmark.benchmark_training``)."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr.config import TrainBenchmarkConfig
from cxr.workflows.benchmark import benchmark_training
from jobs.runtime import init_ray


def main(cfg: TrainBenchmarkConfig) -> int:
    if cfg.steps < 1 or cfg.warmup_steps < 0 or cfg.batch_size < 1:
        print(f"cxr benchmark-train: needs --steps >= 1, --warmup-steps >= 0 and --batch-size >= 1 "
              f"(got {cfg.steps}, {cfg.warmup_steps}, {cfg.batch_size})", file=sys.stderr)
        return 2
    init_ray()
    record = benchmark_training(cfg)
    rates = record["images_per_s"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if isinstance(v, float))
    print(f"training step of {cfg.model} at {cfg.image_size} px, batch {cfg.batch_size} ({record['machine']}), "
          f"images/s: {parts}" + (f"; compile failed: {rates['compile_error']}" if "compile_error" in rates else "")
          + f"; wrote {Path(cfg.out) / 'benchmark_train.json'}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["benchmark-train", *sys.argv[1:]]))
