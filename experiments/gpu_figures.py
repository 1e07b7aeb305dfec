"""The GPU figures of docs/RESULTS.md in one process, planned to a time budget (a GPU lease):

One Ray and one process for every step, each a library workflow:

1. manifests of the curated data (``cxr prepare-data``);
2. ``cxr benchmark-train --use-gpu`` at each of ``--train-batch-sizes`` (the training step
   taken apart): where pretraining time goes;
3. the lung UNet (``segmenter-gpu`` preset), registered, and its Dice on JSRT (never trained on);
4. pretraining on the source task (``pretrain-gpu``): its images/s is the throughput figure; it
   stops early (keeping its best checkpoint) where the budget needs the time for what follows;
5. the paper's 4-class fine-tune from it (``finetune-gpu``), registered, so the scorer has a
   classifier; it is also the ablation's paper-4class seed 0;
6. ``cxr benchmark --use-gpu`` on ``--score-images`` images (the scoring throughput figure,
   with its start-up and steady state);
7. ``cxr ablation`` (variant, seed) pairs, seed by seed (the paper's tables and the ablation);
8. ``cxr crossval`` folds of ``--crossval-recipes`` at full scale (the cross-archive table).

The plan (each step's expected seconds, from the rates the last recorded run measured,
``docs/results/gpu/figures.json``) is printed and recorded first. Before each step the clock is
checked against ``--budget-s``: a step that would not end in time is recorded as skipped, and
where later steps need it (segmenter, pretraining, the registered fine-tune) the command stops
there, so it ends cleanly with what finished. Every step's result is appended to ``OUT/figures.json`` as soon as it ends (and the
compact set of result files copied to ``--export``, the device tool's ``$OUT``), so a run
killed at its limit keeps what it measured; the same command run again resumes. ``--smoke``
shrinks every step to seconds, for a CPU check of the whole chain.

    python -m experiments.gpu_figures --out DIR [--budget-s 540] [--export $OUT] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from cxr.workflows.ablation import VARIANTS, run_ablation
from cxr.config import (CONFIG_DIR, REPO_ROOT, FinetuneConfig, PrepareDataConfig, PretrainConfig, SegmenterTrainConfig,
                        default_data_root, load_config, load_platform)
from cxr.crossval import ALL, RECIPES, plan_folds
from cxr.data.manifest import read_manifest
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
SOURCE_TRAIN_IMAGES = 4759          # the source task's training split (docs/RESULTS.md)

# Expected seconds per step where no run was recorded: the first GPU run (H200, 2026-11-26,
# docs/RESULTS.md): segmenter 110 s for 30 epochs with evaluation and registration; pretraining
# 1,269 images/s plus validation; a fine-tune of the paper's schedule about 2.5 min in all;
# scoring 557 images/s on 20,000 with start-up over half.
DEFAULT_EXPECTED = {
    "start": 25, "prepare-data": 30, "benchmark-train": 30,
    "segmenter_per_epoch": 3.2, "segmenter_fixed": 20, "segmenter-jsrt": 25,
    "pretrain_per_epoch": SOURCE_TRAIN_IMAGES / 1269 + 0.6, "pretrain_fixed": 30,
    "finetune": 160, "benchmark_fixed": 35, "benchmark_images_per_s": 1000, "crossval_fold": 240,
}
RECORDED = REPO_ROOT / "docs" / "results" / "gpu" / "figures.json"   # the last run's records (experiments/gpu_tables.py)
# Leave-one-archive-out folds per recipe at full scale (cxr crossval's plan on ../shared/data,
# docs/results/crossval): the plan's estimate only; the run counts them from the manifests.
MIN_PRETRAIN_S = 60.0         # less pretraining than this is not worth a fine-tune
CROSSVAL_FOLDS = {"screen": 10, "paper": 6, "deconfounded-nomask": 9}


def expected_seconds(recorded: Path = RECORDED) -> tuple[dict, str]:
    """Each step's expected seconds from the rates the last recorded GPU run measured (falling
    back to ``DEFAULT_EXPECTED`` for steps it did not finish), and where they came from."""
    e = dict(DEFAULT_EXPECTED)
    if not recorded.exists():
        return e, "the defaults (no recorded run)"
    figures = json.loads(recorded.read_text())
    machines = [f for f in figures if f["step"] == "machine"]
    if not machines:
        return e, f"the defaults ({recorded} holds no run)"
    # The latest record of each step that ran (not skipped, not a reused earlier result).
    done = {f["step"]: f for f in figures if "skipped" not in f and not f.get("reused")}
    for step in ("prepare-data", "segmenter-jsrt"):
        if step in done:
            e[step] = done[step]["seconds"]
    train = [f["seconds"] for s, f in done.items() if s.startswith("benchmark-train")]
    if train:
        e["benchmark-train"] = max(train)
    if "train-segmenter" in done and done["train-segmenter"].get("epochs"):
        seg = done["train-segmenter"]
        e["segmenter_per_epoch"] = max(0.1, seg["seconds"] - e["segmenter_fixed"]) / seg["epochs"]
    if "pretrain" in done and done["pretrain"].get("epochs"):
        pre = done["pretrain"]
        e["pretrain_per_epoch"] = max(0.1, pre["seconds"] - e["pretrain_fixed"]) / pre["epochs"]
    tunes = [f["seconds"] for s, f in done.items() if s == "finetune" or s.startswith("ablation ")]
    if tunes:
        e["crossval_fold"] *= float(np.mean(tunes)) / e["finetune"]
        e["finetune"] = float(np.mean(tunes))
    steady = done.get("benchmark", {}).get("pipeline", {}).get("steady_images_per_s")
    if steady:
        e["benchmark_images_per_s"] = steady
        e["benchmark_fixed"] = max(0.0, done["benchmark"]["seconds"] - done["benchmark"]["images"] / steady)
    return e, f"{recorded.name} of {machines[-1]['device']}, {machines[-1]['date'][:10]}"


class Budget:
    """The clock of a lease: seconds left of ``seconds`` from now, and whether a step fits."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, expected: float) -> bool:
        return expected <= self.left()


def export(out: Path, to: Path | None) -> None:
    """Copy the compact result files to ``to`` (flat, a few files: the device tool's limits)."""
    if to is None:
        return
    to.mkdir(parents=True, exist_ok=True)
    files = [("figures.json", "figures.json"), ("ablation/results.json", "ablation-results.json"),
             ("ablation/table.md", "ablation-table.md")]
    # Each crossval recipe has its own folder (cxr crossval writes one results.json per --out).
    for recipe in sorted(p.name for p in (out / "crossval").glob("*") if p.is_dir()):
        files += [(f"crossval/{recipe}/results.json", f"crossval-{recipe}-results.json"),
                  (f"crossval/{recipe}/table.md", f"crossval-{recipe}-table.md")]
    for src, name in files:
        if (out / src).exists():
            shutil.copyfile(out / src, to / name)


def record(out: Path, step: str, result: dict, started: float, to: Path | None = None) -> None:
    """Append one step's result to OUT/figures.json (rewritten whole: readers never see half)."""
    path = out / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else []
    figures.append({"step": step, "seconds": round(time.perf_counter() - started, 1), **result})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=2, default=str))
    tmp.replace(path)
    export(out, to)
    print(f"gpu_figures: {step} {'skipped' if 'skipped' in result else 'done'} in {figures[-1]['seconds']} s",
          flush=True)


def finished(out: Path) -> dict[str, dict]:
    """Steps a previous run of the same command completed (not skipped): {step: its record}."""
    path = out / "figures.json"
    return ({f["step"]: f for f in json.loads(path.read_text()) if "skipped" not in f} if path.exists() else {})


def flags_to_config(command: str, flags: list[str]):
    """A job config from command-line flags, as ``cxr COMMAND FLAGS`` resolves it."""
    return config_for(build_parser().parse_args([command, *flags]))


def plan(args, e: dict) -> list[tuple[str, float]]:
    """(step, expected seconds from ``e``) in the order they run; one line per ablation run and
    per crossval recipe (they fill what is left)."""
    steps = [("start", e["start"]), ("prepare-data", e["prepare-data"])]
    steps += [(f"benchmark-train-{b}", e["benchmark-train"]) for b in args.train_batch_sizes.split(",") if b]
    steps += [("train-segmenter", e["segmenter_fixed"] + e["segmenter_per_epoch"] * args.segmenter_epochs),
              ("segmenter-jsrt", e["segmenter-jsrt"]),
              ("pretrain", e["pretrain_fixed"] + e["pretrain_per_epoch"] * args.pretrain_epochs),
              ("finetune", e["finetune"]),
              ("benchmark", e["benchmark_fixed"] + args.score_images / e["benchmark_images_per_s"])]
    steps += [(f"ablation {v} seed {s}", e["finetune"]) for v, s in ablation_pairs(args)]
    steps += [(f"crossval {r} ({CROSSVAL_FOLDS.get(r, 1)} folds)", e["crossval_fold"] * CROSSVAL_FOLDS.get(r, 1))
              for r in args.crossval_recipes.split(",") if r]
    return steps


def ablation_pairs(args) -> list[tuple[str, int]]:
    """Seed by seed (every variant at seed 0 first), less paper-4class seed 0 (the ``finetune`` step)."""
    seeds = [int(s) for s in ("0" if args.smoke else args.seeds).split(",")]
    return [(v, s) for s in seeds for v in args.variants.split(",") if (v, s) != ("paper-4class", 0)]


def print_plan(steps: list[tuple[str, float]], budget_s: float, source: str) -> list[dict]:
    total, rows = 0.0, []
    print(f"gpu_figures: plan for a budget of {budget_s:.0f} s (expected seconds from the rates of {source}):")
    for step, seconds in steps:
        total += seconds
        fits = total <= budget_s
        rows.append({"step": step, "expected_s": round(seconds), "cumulative_s": round(total), "fits": fits})
        print(f"  {step:40s} {seconds:6.0f} s  (by {total:6.0f} s){'' if fits else '  beyond the budget'}")
    return rows


def build_parser_for_plan() -> argparse.ArgumentParser:
    """The command line (also what experiments.gpu_tables plans the default protocol with)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for figures.json, ablation/ and crossval/")
    p.add_argument("--export", default=None, help="also copy the compact result files here after every step "
                                                  "(the device tool's $OUT: flat, 3 files + 2 per crossval recipe)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds this command may take (default 540, a 9-minute lease; none with --smoke)")
    p.add_argument("--manifests", default="out/manifests")
    p.add_argument("--train-batch-sizes", default="32,128", help="cxr benchmark-train batch sizes ('' for none): the "
                                                                "paper's 32, and 128")
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile (a minute more)")
    p.add_argument("--segmenter-epochs", type=int, default=30)
    p.add_argument("--pretrain-epochs", type=int, default=100, help="the recipe's 100; stops early to fit the budget")
    p.add_argument("--score-images", type=int, default=40000)
    p.add_argument("--score-args", default="--batch-size 256 --actors 4 --gpus-per-actor 0.25 --decode-tasks 10 "
                                           "--naive-images 300", help="extra cxr benchmark flags")
    p.add_argument("--variants", default="paper-4class,paper-3class,deconfounded-4class,scratch-4class,nomask-4class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--crossval-recipes", default="screen,paper", help="cxr crossval recipes (cxr/crossval.py)")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks the chain, measures nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser_for_plan().parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1e9 if args.smoke else 540.0
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    to = Path(args.export) if args.export else None
    rates, source = expected_seconds()
    steps = plan(args, rates)
    expected = dict(steps)
    platform = load_platform()
    init_ray()      # one Ray for every step
    smoke = SMOKE if args.smoke else {}
    gpu = not args.smoke
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    record(out, "machine", {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
                            "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv,
                            "budget_s": args.budget_s, "plan_source": source,
                            "plan": print_plan(steps, args.budget_s, source)},
           time.perf_counter(), to)
    done = finished(out)

    def skip(step: str, t: float, need: float) -> None:
        record(out, step, {"skipped": f"expected {need:.0f} s, {budget.left():.0f} s left"}, t, to)

    t = time.perf_counter()
    if "prepare-data" not in done:
        summary = prepare_manifests(PrepareDataConfig(out=args.manifests), platform)
        if any(s["patient_leaks"] for s in summary.values()):
            print("gpu_figures: the manifests leak patients across splits; stopping", file=sys.stderr)
            return 1
        record(out, "prepare-data", {}, t, to)

    for batch in [b for b in args.train_batch_sizes.split(",") if b]:
        t, step = time.perf_counter(), f"benchmark-train-{batch}"
        flags = ["--batch-size", batch, "--out", str(out / step)]
        flags += (["--model", "resnet18-tiny", "--image-size", "64", "--steps", "3", "--warmup-steps", "1"] if args.smoke
                  else ["--use-gpu", "--steps", "20", "--warmup-steps", "5", *(["--compile"] if args.compile else [])])
        if step in done:
            continue
        if budget.fits(expected[step]):
            record(out, step, benchmark_training(flags_to_config("benchmark-train", flags)), t, to)
        else:
            skip(step, t, expected[step])

    def stop(step: str, t: float, need: float) -> int:
        """Everything after ``step`` needs it: record the skip and end cleanly with what finished."""
        skip(step, t, need)
        print(f"gpu_figures: stopping: {step} would not end within the budget, and the steps after it need it")
        return 0

    t = time.perf_counter()
    if "train-segmenter" in done:
        seg_uri = done["train-segmenter"]["model"]
    elif not budget.fits(expected["train-segmenter"]):
        return stop("train-segmenter", t, expected["train-segmenter"])
    else:
        seg = train_segmenter(load_config(SegmenterTrainConfig, str(PRESETS / "segmenter-gpu.yaml"), {
            "manifest": f"{args.manifests}/lungseg.parquet", "epochs": 1 if args.smoke else args.segmenter_epochs,
            "use_gpu": gpu, **({"image_size": 64, "max_train_images": 16, "loader_workers": 0} if args.smoke else {})}),
            platform)
        seg_uri = f"models:/{seg['model_name']}/{seg['version']}"
        record(out, "train-segmenter", {"model": seg_uri, "run_id": seg["run_id"], "report": seg["report"],
                                        "epochs": 1 if args.smoke else args.segmenter_epochs,
                                        "train_seconds": seg["train_seconds"]}, t, to)

    t = time.perf_counter()
    if "segmenter-jsrt" not in done:
        if not (Path(default_data_root()) / "external" / "jsrt" / "pairs.csv").exists():
            record(out, "segmenter-jsrt", {"skipped": f"no external/jsrt under {default_data_root()}"}, t, to)
        elif budget.fits(expected["segmenter-jsrt"]):
            from experiments.segmenter_external import evaluate
            jsrt = evaluate(seg_uri, default_data_root(), f"{args.manifests}/lungseg.parquet", 8 if args.smoke else None)
            record(out, "segmenter-jsrt", {"dice": jsrt["dice"], "image_size": jsrt["image_size"]}, t, to)
        else:
            skip("segmenter-jsrt", t, expected["segmenter-jsrt"])

    t = time.perf_counter()
    if "pretrain" in done:
        pretrain_run = done["pretrain"]["run_id"]
    elif not budget.fits(MIN_PRETRAIN_S + rates["pretrain_fixed"] + expected["finetune"]):
        # A pretraining cut shorter than this would be reused by every resumed run: better none.
        return stop("pretrain", t, MIN_PRETRAIN_S + rates["pretrain_fixed"] + expected["finetune"])
    else:
        # What follows needs its time: the pretraining gets the rest (and stops after that epoch).
        after = expected["finetune"] + expected["benchmark"]
        limit = None if args.smoke else max(MIN_PRETRAIN_S, budget.left() - after - rates["pretrain_fixed"])
        pre = pretrain(load_config(PretrainConfig, str(PRESETS / "pretrain-gpu.yaml"), {
            "manifest": f"{args.manifests}/tasks/source.parquet", "time_limit_s": limit,
            "stage1_epochs": 1 if args.smoke else args.pretrain_epochs, "use_gpu": gpu, **smoke}), platform)
        pretrain_run = pre["run_id"]
        record(out, "pretrain", {"run_id": pretrain_run, "best": pre["meta"], "minutes": pre["minutes"],
                                 "epochs": pre["epochs"], "epochs_planned": 1 if args.smoke else args.pretrain_epochs,
                                 "time_limit_s": limit, "median_train_images_per_s": pre["images_per_s"]}, t, to)

    finetune_yaml = out / "finetune.yaml"
    preset = yaml.safe_load((PRESETS / "finetune-gpu.yaml").read_text())
    preset.update({"segmenter": seg_uri, "use_gpu": gpu,
                   **({**smoke, "stage1_epochs": 1, "stage2_epochs": 1, "n_boot": 50} if args.smoke else {})})
    finetune_yaml.write_text(yaml.safe_dump(preset))
    ablation_dir = out / "ablation"
    ablation_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    if "finetune" in done:
        cls_uri = done["finetune"]["model"]
    elif not budget.fits(expected["finetune"]):
        return stop("finetune", t, expected["finetune"])
    else:
        # Exactly the ablation's paper-4class seed 0 (cxr.workflows.ablation), registered: it joins the
        # ablation's results rather than being trained twice.
        ft = finetune(load_config(FinetuneConfig, str(finetune_yaml), {
            "manifest": f"{args.manifests}/tasks/dataset2-4class.parquet", "pretrain_run": pretrain_run,
            "classes": list(VARIANTS["paper-4class"][1]), "seed": 0,
            "archive_balanced": False, "photometric": False,                # the paper's recipe
            "register": True, "run_name": "gpu-figures-registered"}), platform)
        cls_uri = f"models:/{ft['model_name']}/{ft['version']}"
        results_file = ablation_dir / "results.json"
        results = [r for r in (json.loads(results_file.read_text()) if results_file.exists() else [])
                   if (r["variant"], r["seed"]) != ("paper-4class", 0)]
        results.append({"variant": "paper-4class", "seed": 0, "run_id": ft["run_id"], "minutes": ft["minutes"],
                        "report": ft["report"]})
        results_file.write_text(json.dumps(results, indent=2))
        record(out, "finetune", {"model": cls_uri, "run_id": ft["run_id"], "minutes": ft["minutes"],
                                 "accuracy": ft["report"]["metrics"]["accuracy"]}, t, to)
    # The fine-tunes that follow take what this one took (measured here, not the old rate).
    finetune_s = float(done.get("finetune", {}).get("seconds") or time.perf_counter() - t)

    t = time.perf_counter()
    bench_out = out / "benchmark-score"
    flags = ["--images", str(64 if args.smoke else args.score_images), "--segmenter", seg_uri,
             "--classifier", cls_uri, "--input", f"{args.manifests}/tasks/dataset2-4class.parquet", "--out", str(bench_out)]
    flags += ["--batch-size", "16", "--naive-images", "8"] if args.smoke else ["--use-gpu", *args.score_args.split()]
    if "benchmark" not in done:
        if budget.fits(expected["benchmark"]):
            bench = flags_to_config("benchmark", flags)
            uris = benchmark_inputs(bench, platform)
            result = {**benchmark_record(bench, uris), "pipeline": benchmark_pipeline(bench, platform, init_ray)}
            if bench.naive_images:
                result["naive"], result["models"] = benchmark_naive(bench, platform, uris[:bench.naive_images])
                result["speedup"] = result["pipeline"]["images_per_s"] / result["naive"]["images_per_s"]
            record(out, "benchmark", result, t, to)
        else:
            skip("benchmark", t, expected["benchmark"])

    for variant, seed in ablation_pairs(args):
        t, step = time.perf_counter(), f"ablation {variant} seed {seed}"
        if step in done:
            continue
        results_file = ablation_dir / "results.json"
        if results_file.exists() and any((r["variant"], r["seed"]) == (variant, seed)
                                         for r in json.loads(results_file.read_text())):
            # In the results from a run cut off before it recorded the step: no new time to count.
            record(out, step, {"results": str(results_file), "reused": True}, t, to)
            continue
        if not budget.fits(finetune_s):
            skip(step, t, finetune_s)
            continue
        run_ablation(flags_to_config("ablation", [
            "--pretrain-run", pretrain_run, "--finetune-config", str(finetune_yaml), "--manifests", args.manifests,
            "--variants", variant, "--seeds", str(seed), "--out", str(ablation_dir)]), platform)
        record(out, step, {"results": str(results_file)}, t, to)

    fold_s = rates["crossval_fold"] * finetune_s / rates["finetune"]
    for recipe in [r for r in args.crossval_recipes.split(",") if r]:
        flags = ["--pretrain-run", pretrain_run, "--finetune-config", str(finetune_yaml), "--manifests", args.manifests,
                 "--recipes", recipe, "--segmenter", seg_uri, "--register", "--out", str(out / "crossval" / recipe),
                 *(["--n-boot", "50"] if args.smoke else [])]
        cv = flags_to_config("crossval", flags)
        task = read_manifest(f"{args.manifests}/tasks/{RECIPES[recipe]['task']}.parquet")
        folds = [ALL] if args.smoke else plan_folds(task, cv.min_archive_images)
        finished_folds = []
        for fold in folds:           # one step per fold, so a lease's minutes go to whole folds
            t, step = time.perf_counter(), f"crossval {recipe} {fold}"
            if step in done:
                finished_folds.append(fold)
                continue
            if not budget.fits(fold_s):
                skip(step, t, fold_s)
                continue
            # The all-archives fold (last) registers a model whose card holds the other folds'
            # results: they are named too, and read back from their JSON, not retrained.
            these = [*finished_folds, fold] if fold == ALL else [fold]
            run_crossval(flags_to_config("crossval", [*flags, "--folds", ",".join(these)]), platform)
            finished_folds.append(fold)
            record(out, step, {"results": str(out / "crossval" / recipe / "results.json")}, t, to)
        if finished_folds:
            # The recipe's table over every finished fold (read back from their JSON: seconds).
            run_crossval(flags_to_config("crossval", [*flags, "--folds", ",".join(finished_folds)]), platform)
            export(out, to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
