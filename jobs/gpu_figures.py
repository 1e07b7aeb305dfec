"""The GPU figures of docs/RESULTS.md in one process, for a GPU machine held for minutes:

One Ray and one process for every step, each a library workflow:

1. ``cxr benchmark-train --use-gpu`` at each of ``--train-batch-sizes`` (the training step
   taken apart, ``torch.compile`` included at the first size): where pretraining time goes;
2. manifests of the curated data (``cxr prepare-data``);
3. the lung UNet (``segmenter-gpu`` preset), registered;
4. pretraining on the source task (``pretrain-gpu``): its images/s is the throughput figure;
5. one fine-tune from it (``finetune-gpu``), registered, so the scorer has a classifier;
6. ``cxr benchmark --use-gpu`` on ``--score-images`` images (the scoring throughput figure,
   with its start-up and steady state);
7. ``cxr ablation`` over ``--variants`` x ``--seeds`` (the paper's tables and the ablation);
8. ``cxr crossval`` of ``--crossval-recipes`` at full scale (the cross-archive table), the
   all-archives fold registered; in that order, until done or killed.

Every step's result is appended to ``OUT/figures.json`` as soon as it ends, and the ablation
keeps ``OUT/ablation/results.json`` current, so a run cut off by the machine's time limit keeps
what it measured, and the same command run again resumes: finished steps are reused, the
ablation runs only the (variant, seed) pairs still missing. ``--smoke`` shrinks every step to
seconds, for a CPU check of the whole chain.

    python -m jobs.gpu_figures --out DIR [--pretrain-epochs 30] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from cxr.ablation import run_ablation
from cxr.config import (CONFIG_DIR, FinetuneConfig, PrepareDataConfig, PretrainConfig, SegmenterTrainConfig, load_config,
                        load_platform)
from cxr.workflows.benchmark import (benchmark_inputs, benchmark_naive, benchmark_pipeline, benchmark_record,
                                     benchmark_training)
from cxr.workflows.classifier import finetune, pretrain
from cxr.workflows.crossval import run_crossval
from cxr.workflows.data import prepare_manifests
from cxr.workflows.segmenter import train_segmenter
from jobs.cli import build_parser, config_for
from jobs.runtime import init_ray

PRESETS = CONFIG_DIR / "presets"
SMOKE = {"image_size": 64, "max_train_images": 32, "num_workers": 1}


def record(out: Path, step: str, result: dict, started: float) -> None:
    """Append one step's result to OUT/figures.json (rewritten whole: readers never see half)."""
    path = out / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else []
    figures.append({"step": step, "seconds": round(time.perf_counter() - started, 1), **result})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=2, default=str))
    tmp.replace(path)
    print(f"gpu_figures: {step} done in {figures[-1]['seconds']} s", flush=True)


def finished(out: Path) -> dict[str, dict]:
    """Steps a previous run of the same command completed: {step: its record}."""
    path = out / "figures.json"
    return {f["step"]: f for f in json.loads(path.read_text())} if path.exists() else {}


def flags_to_config(command: str, flags: list[str]):
    """A job config from command-line flags, as ``cxr COMMAND FLAGS`` resolves it."""
    return config_for(build_parser().parse_args([command, *flags]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for figures.json and ablation/")
    p.add_argument("--manifests", default="out/manifests")
    p.add_argument("--train-batch-sizes", default="32,128", help="cxr benchmark-train batch sizes")
    p.add_argument("--segmenter-epochs", type=int, default=30)
    p.add_argument("--pretrain-epochs", type=int, default=30, help="the recipe's 100 take about 4 minutes more")
    p.add_argument("--score-images", type=int, default=200000,
                   help="long enough that start-up is a small share (see docs/RESULTS.md)")
    p.add_argument("--score-args", default="--batch-size 256 --actors 4 --gpus-per-actor 0.25 --decode-tasks 10 "
                                           "--naive-images 300", help="extra cxr benchmark flags")
    p.add_argument("--variants", default="paper-4class,paper-3class,deconfounded-4class,scratch-4class,nomask-4class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--crossval-recipes", default="screen,paper", help="cxr crossval recipes (cxr/crossval.py)")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks the chain, measures nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    platform = load_platform()
    init_ray()      # one Ray for every step
    smoke = SMOKE if args.smoke else {}
    gpu = not args.smoke
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    record(out, "machine", {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
                            "torch": torch.__version__, "argv": sys.argv[1:]}, time.perf_counter())

    done = finished(out)
    for i, batch in enumerate(args.train_batch_sizes.split(",")):
        t, step, bench_train = time.perf_counter(), f"benchmark-train-{batch}", out / f"benchmark-train-{batch}"
        flags = ["--batch-size", batch, "--out", str(bench_train)]
        flags += (["--model", "resnet18-tiny", "--image-size", "64", "--steps", "3", "--warmup-steps", "1"] if args.smoke
                  else ["--use-gpu", *(["--compile"] if i == 0 else [])])
        if step not in done:
            record(out, step, benchmark_training(flags_to_config("benchmark-train", flags)), t)

    t = time.perf_counter()
    if "prepare-data" not in done:
        summary = prepare_manifests(PrepareDataConfig(out=args.manifests), platform)
        if any(s["patient_leaks"] for s in summary.values()):
            return 1
        record(out, "prepare-data", {}, t)

    t = time.perf_counter()
    if "train-segmenter" in done:
        seg_uri = done["train-segmenter"]["model"]
    else:
        seg = train_segmenter(load_config(SegmenterTrainConfig, str(PRESETS / "segmenter-gpu.yaml"), {
            "manifest": f"{args.manifests}/lungseg.parquet", "epochs": 1 if args.smoke else args.segmenter_epochs,
            "use_gpu": gpu, **({"image_size": 64, "max_train_images": 16, "loader_workers": 0} if args.smoke else {})}),
            platform)
        seg_uri = f"models:/{seg['model_name']}/{seg['version']}"
        record(out, "train-segmenter", {"model": seg_uri, "run_id": seg["run_id"], "report": seg["report"],
                                        "train_seconds": seg["train_seconds"]}, t)

    t = time.perf_counter()
    if "pretrain" in done:
        pretrain_run = done["pretrain"]["run_id"]
    else:
        pre = pretrain(load_config(PretrainConfig, str(PRESETS / "pretrain-gpu.yaml"), {
            "manifest": f"{args.manifests}/tasks/source.parquet",
            "stage1_epochs": 1 if args.smoke else args.pretrain_epochs, "use_gpu": gpu, **smoke}), platform)
        pretrain_run = pre["run_id"]
        record(out, "pretrain", {"run_id": pretrain_run, "best": pre["meta"], "minutes": pre["minutes"],
                                 "median_train_images_per_s": pre["images_per_s"]}, t)

    finetune_yaml = out / "finetune.yaml"
    preset = yaml.safe_load((PRESETS / "finetune-gpu.yaml").read_text())
    preset.update({"segmenter": seg_uri, "use_gpu": gpu,
                   **({**smoke, "stage1_epochs": 1, "stage2_epochs": 1, "n_boot": 50} if args.smoke else {})})
    finetune_yaml.write_text(yaml.safe_dump(preset))
    t = time.perf_counter()
    if "finetune" in done:
        cls_uri = done["finetune"]["model"]
    else:
        ft = finetune(load_config(FinetuneConfig, str(finetune_yaml), {
            "manifest": f"{args.manifests}/tasks/dataset2-4class.parquet", "pretrain_run": pretrain_run,
            "archive_balanced": False, "photometric": False,                # the paper's recipe
            "register": True, "run_name": "gpu-figures-registered"}), platform)
        cls_uri = f"models:/{ft['model_name']}/{ft['version']}"
        record(out, "finetune", {"model": cls_uri, "run_id": ft["run_id"], "minutes": ft["minutes"],
                                 "accuracy": ft["report"]["metrics"]["accuracy"]}, t)

    t = time.perf_counter()
    bench_out = Path("out/benchmark-gpu")
    flags = ["--images", str(64 if args.smoke else args.score_images), "--segmenter", seg_uri,
             "--classifier", cls_uri, "--input", f"{args.manifests}/tasks/dataset2-4class.parquet", "--out", str(bench_out)]
    flags += ["--batch-size", "16", "--naive-images", "8"] if args.smoke else ["--use-gpu", *args.score_args.split()]
    if "benchmark" not in done:
        bench = flags_to_config("benchmark", flags)
        uris = benchmark_inputs(bench, platform)
        result = {**benchmark_record(bench, uris), "pipeline": benchmark_pipeline(bench, platform, init_ray)}
        if bench.naive_images:
            result["naive"], result["models"] = benchmark_naive(bench, platform, uris[:bench.naive_images])
            result["speedup"] = result["pipeline"]["images_per_s"] / result["naive"]["images_per_s"]
        record(out, "benchmark", result, t)

    t = time.perf_counter()
    run_ablation(flags_to_config("ablation", [
        "--pretrain-run", pretrain_run, "--finetune-config", str(finetune_yaml), "--manifests", args.manifests,
        "--variants", args.variants, "--seeds", "0" if args.smoke else args.seeds, "--out", str(out / "ablation")]),
        platform)
    record(out, "ablation", {"results": str(out / "ablation" / "results.json")}, t)

    t = time.perf_counter()
    run_crossval(flags_to_config("crossval", [
        "--pretrain-run", pretrain_run, "--finetune-config", str(finetune_yaml), "--manifests", args.manifests,
        "--recipes", args.crossval_recipes, "--segmenter", seg_uri, "--register", "--out", str(out / "crossval"),
        *(["--folds", "(none held out)", "--n-boot", "50"] if args.smoke else [])]), platform)
    record(out, "crossval", {"results": str(out / "crossval" / "results.json")}, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
