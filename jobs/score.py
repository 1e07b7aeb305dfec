"""``cxr score``: the nightly scoring job. Resolves the registered models, lists the inputs,
skips what is already scored, streams the rest through Ray Data and prints a summary.

Exit codes: 0 done (bad images are rows, not failures); 1 a systemic failure (a model alias
missing, the output not writable, storage unreachable), with a one-line reason on stderr.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from datetime import datetime, timezone


from cxr import tracking
from cxr.config import ScoreConfig, load_platform
from cxr.data.manifest import read_manifest
from cxr.data.storage import absolute_uri, filesystem_for, list_files, write_bytes
from cxr.scoring import (AtomicParquetSink, ModelRef, ScoringPredictor, decode_batch, read_scores, scored_keys)
from jobs.runtime import init_ray

log = logging.getLogger("cxr.jobs.score")


class SystemicFailure(RuntimeError):
    """Stops the job: nothing about one image, everything about the run."""


def resolve(tracking_uri: str, model_uri: str) -> ModelRef:
    try:
        version = tracking.resolve_version(tracking_uri, model_uri)
    except Exception as e:  # MLflow raises its own types for a missing alias, model or server
        raise SystemicFailure(f"cannot resolve {model_uri}: {str(e).splitlines()[0]}") from e
    alias = model_uri.split("@", 1)[1] if "@" in model_uri else None
    return ModelRef(model_uri, version.name, str(version.version), alias, version.run_id)


def list_inputs(cfg: ScoreConfig, storage) -> list[str]:
    source = absolute_uri(cfg.input)
    try:
        if source.endswith(".parquet"):
            uris = read_manifest(source, storage)["uri"].dropna().astype(str).tolist()
        else:
            uris = list_files(source, storage)
    except (OSError, FileNotFoundError) as e:
        raise SystemicFailure(f"cannot list input {cfg.input}: {e}") from e
    unique = list(dict.fromkeys(uris))    # a manifest may name a file twice: one row per input
    if len(unique) < len(uris):
        log.warning("%s names %d URIs more than once; each is scored once", cfg.input, len(uris) - len(unique))
    return unique[:cfg.limit] if cfg.limit else unique


def check_writable(output: str, storage) -> None:
    probe = f"{output.rstrip('/')}/_tmp/_probe-{uuid.uuid4().hex}"
    try:
        write_bytes(probe, b"", storage)
        fs, path = filesystem_for(probe, storage)
        fs.delete_file(path)
    except OSError as e:
        raise SystemicFailure(f"output {output} is not writable: {e}") from e


def run(cfg: ScoreConfig) -> dict:
    """Score; returns the summary of this job's rows."""
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources, TaskPoolStrategy

    platform = load_platform()
    storage, uri = platform.storage, platform.tracking_uri
    output = absolute_uri(cfg.output)
    job_id = cfg.job_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_date = datetime.now(timezone.utc).date().isoformat()
    segmenter, classifier = resolve(uri, cfg.segmenter), resolve(uri, cfg.classifier)
    check_writable(output, storage)
    inputs = list_inputs(cfg, storage)
    skip = scored_keys(output, segmenter, classifier, storage)
    seg_size = int(tracking.load_card(uri, segmenter.pinned_uri)["input"]["shape"][-1])
    cls_size = int(tracking.load_card(uri, classifier.pinned_uri)["preprocessing"]["letterbox_size"])
    log.info("job %s: %d inputs, %d already scored with %s v%s + %s v%s", job_id, len(inputs), len(skip),
             segmenter.name, segmenter.version, classifier.name, classifier.version)
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    init_ray()
    # Decoding runs in its own tasks, beside the model actors: Ray Data fuses a task stage into
    # an actor stage whose pool size equals the task stage's, and a fused actor would decode
    # and infer in turn on one core.
    decode_tasks = cfg.decode_tasks or 2 * cfg.actors
    if decode_tasks == cfg.actors:
        decode_tasks += 1
    if cfg.object_store_mb:
        # Without a cap, decoding outruns the models and Ray Data lets decoded blocks queue up to
        # its share of the object store (650 MiB seen on 2 cores): memory grew with the run.
        options = ray.data.DataContext.get_current().execution_options
        options.resource_limits = ExecutionResources.for_limits(object_store_memory=cfg.object_store_mb * 2**20)
    if inputs:
        ds = ray.data.from_items([{"uri": u} for u in inputs])
        ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=16,
                            fn_kwargs={"sizes": (cls_size, seg_size), "skip": skip,
                                       "max_bytes": int(cfg.max_file_mb * 2**20), "storage": storage},
                            compute=TaskPoolStrategy(size=decode_tasks))
        ds = ds.map_batches(
            ScoringPredictor, batch_format="numpy", batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.actors), num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0,
            num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs={"tracking_uri": uri, "segmenter": segmenter.__dict__,
                                   "classifier": classifier.__dict__, "heatmap_size": cfg.heatmap_size,
                                   "quality": {"no_lungs": cfg.no_lung_fraction, "low": cfg.min_lung_fraction,
                                               "high": cfg.max_lung_fraction},
                                   "job_id": job_id, "threads": cfg.torch_threads or max(1, int(cfg.cpus_per_actor)),
                                   "use_gpu": cfg.use_gpu, "cpu_bf16": cfg.cpu_bf16})
        try:
            ds.write_datasink(AtomicParquetSink(output, run_date, job_id, storage))
        except Exception as e:  # a task failed beyond Ray's retries: storage down, a model that cannot run
            # Parts committed so far stay valid; the next run scores only what is missing.
            raise SystemicFailure(f"pipeline failed (committed parts are kept; rerun to resume): "
                                  f"{str(e).strip().splitlines()[-1][:300]}") from e
    seconds = time.perf_counter() - started
    rows = read_scores(output, storage, ["job_id", "status", "predicted_label", "screen_positive"]).to_pandas()
    mine = rows[rows["job_id"] == job_id]
    return {"job_id": job_id, "inputs": len(inputs), "skipped": len(inputs) - len(mine), "scored": len(mine),
            "by_status": mine["status"].value_counts().to_dict(),
            "by_label": mine["predicted_label"].value_counts().to_dict(),
            "screen_positive": int(mine["screen_positive"].eq(True).sum()),   # null: no threshold or an error
            "seconds": seconds,
            "images_per_s": len(mine) / seconds if seconds > 0 else 0.0, "started_at": started_at, "output": output,
            "segmenter": f"{segmenter.name} v{segmenter.version}", "classifier": f"{classifier.name} v{classifier.version}"}


def main(cfg: ScoreConfig) -> int:
    try:
        summary = run(cfg)
    except SystemicFailure as e:
        print(f"cxr score: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))) or "none"

    return (f"score job {s['job_id']}: {s['inputs']} inputs, {s['scored']} scored, {s['skipped']} already scored; "
            f"status: {counts(s['by_status'])}; predicted: {counts(s['by_label'])}; "
            f"COVID screen-positive: {s['screen_positive']}; "
            f"{s['images_per_s']:.1f} images/s; models {s['segmenter']} + {s['classifier']}; output {s['output']}")


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["score", *sys.argv[1:]]))
