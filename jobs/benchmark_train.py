"""``cxr benchmark-train``: the classifier's training step timed in parts (``cxr.train.throughput``)
in one Ray Train worker, as ``cxr pretrain`` runs it. Prints images/s of each part and writes
them to OUT/benchmark_train.json."""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr.config import TrainBenchmarkConfig, config_to_dict
from cxr.train.throughput import RESULTS, throughput_loop_per_worker
from jobs.benchmark import machine
from jobs.runtime import init_ray


def main(cfg: TrainBenchmarkConfig) -> int:
    if cfg.steps < 1 or cfg.warmup_steps < 0 or cfg.batch_size < 1:
        print(f"cxr benchmark-train: needs --steps >= 1, --warmup-steps >= 0 and --batch-size >= 1 "
              f"(got {cfg.steps}, {cfg.warmup_steps}, {cfg.batch_size})", file=sys.stderr)
        return 2
    init_ray()
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
    parts = ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if isinstance(v, float))
    print(f"training step of {cfg.model} at {cfg.image_size} px, batch {cfg.batch_size} ({record['machine']}), "
          f"images/s: {parts}" + (f"; compile failed: {rates['compile_error']}" if "compile_error" in rates else "")
          + f"; wrote {out / 'benchmark_train.json'}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["benchmark-train", *sys.argv[1:]]))
