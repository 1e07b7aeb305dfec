"""The nightly scoring workflow: ``plan_scoring`` resolves the models, checks the output, takes
its lease, lists the inputs and reads what is already scored (no Ray needed, so a systemic
fault stops the job before Ray starts); ``run_scoring`` streams the rest through Ray Data and
summarises what the job wrote."""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from datetime import datetime, timezone

from cxr import tracking
from cxr.card import CardError, ModelCard
from cxr.config import PlatformConfig, ScoreConfig
from cxr.data.manifest import read_manifest
from cxr.data.storage import (ENTRY_SCHEMA, absolute_uri, entry_batches, filesystem_for, inventory_entries, is_s3,
                              stat_entries, write_bytes)
from cxr.data.dicom_header import Pseudonymiser
from cxr.lease import Lease, LeaseHeld
from cxr.new_work import decide
from cxr.workflows.monitor import read_night
from cxr.scores_table import AtomicParquetSink, add_up, clear_scratch, finish_compactions
from cxr.scoring import ModelRef, ScoringPredictor, decode_batch

log = logging.getLogger(__name__)


class SystemicFailure(RuntimeError):
    """Stops the job: nothing about one image, everything about the run."""


def resolve(tracking_uri: str, model_uri: str) -> ModelRef:
    try:
        version = tracking.resolve_version(tracking_uri, model_uri)
    except Exception as e:  # MLflow raises its own types for a missing alias, model or server
        raise SystemicFailure(f"cannot resolve {model_uri}: {str(e).splitlines()[0]}") from e
    alias = model_uri.split("@", 1)[1] if "@" in model_uri else None
    return ModelRef(model_uri, version.name, str(version.version), alias, version.run_id)


def resolve_models(tracking_uri: str, classifier_uri: str,
                   segmenter_uri: str | None) -> tuple[ModelRef, ModelCard, ModelRef | None, ModelCard | None]:
    """The classifier, and the segmenter its card pins if it was trained on lungs (else
    ``segmenter_uri``, for the lung-area quality signal only, or none). A screen
    (``models:/cxr-screen@champion``) stands for the classifier and segmenter it was built
    from, so the night runs exactly what was promoted."""
    screen = _screen_parts(tracking_uri, classifier_uri)
    if screen is not None:
        classifier_uri, segmenter_uri = screen
    classifier = resolve(tracking_uri, classifier_uri)
    try:
        # The architecture is checked where the model is built (the actors): the driver imports no torch.
        card = tracking.load_card(tracking_uri, classifier.pinned_uri, check_architecture=False)
    except CardError as e:
        raise SystemicFailure(f"{classifier.pinned_uri}: {e}") from e
    prep = card.preprocessing
    if prep.lung_mask:
        segmenter = resolve(tracking_uri, prep.segmenter_uri)
        if segmenter_uri and segmenter_uri != prep.segmenter_uri:
            log.info("%s was trained on lungs cut by %s: scoring with it, not %s", classifier.pinned_uri,
                     prep.segmenter_uri, segmenter_uri)
    else:
        segmenter = resolve(tracking_uri, segmenter_uri) if segmenter_uri else None
    seg_card = tracking.load_card(tracking_uri, segmenter.pinned_uri, check_architecture=False) if segmenter else None
    return classifier, card, segmenter, seg_card


def _screen_parts(tracking_uri: str, model_uri: str) -> tuple[str, str | None] | None:
    """(classifier URI, segmenter URI or None) of a registered screen; None for a classifier."""
    try:
        version = tracking.resolve_version(tracking_uri, model_uri)
    except Exception as e:  # MLflow raises its own types for a missing alias, model or server
        raise SystemicFailure(f"cannot resolve {model_uri}: {str(e).splitlines()[0]}") from e
    if version.tags.get("cxr.task") != "screen":
        return None
    if not version.tags.get("cxr.classifier"):
        raise SystemicFailure(f"{model_uri} (screen v{version.version}) names no registered classifier")
    segmenter = version.tags.get("cxr.segmenter")
    log.info("%s is screen v%s: %s + %s", model_uri, version.version, version.tags["cxr.classifier"], segmenter or "no segmenter")
    return f"models:/{version.tags['cxr.classifier']}", f"models:/{segmenter}" if segmenter else None


def check_output_outside_input(output: str, source: str) -> None:
    """Scores written inside the scored folder would be scored as input the next night."""
    if source.endswith(".parquet"):
        return
    inside = output.rstrip("/") + "/"
    if inside.startswith(source.rstrip("/") + "/"):
        raise SystemicFailure(f"output {output} is inside the input {source}: the next run would score its own "
                              "files; write the scores elsewhere")


def list_inputs(cfg: ScoreConfig, storage) -> pa.RecordBatchReader:
    """The inputs, once each, with their size and modification time (``ENTRY_SCHEMA``), from
    metadata only: a listing, read as it comes (the decision streams it: ``cxr.new_work``), or
    a manifest's ``uri`` column (plus one HEAD per object). A missing input (a folder, an S3
    bucket or a prefix with no object) stops the job (``check_listed``)."""
    source = absolute_uri(cfg.input)
    try:
        if is_inventory(source, storage):
            return inventory_entries(source, storage).to_reader()
        if source.endswith(".parquet"):
            uris = read_manifest(source, storage, columns=["uri"])["uri"].dropna().astype(str).tolist()
            unique = list(dict.fromkeys(uris))    # a manifest may name a file twice: one row per input
            if len(unique) < len(uris):
                log.warning("%s names %d URIs more than once; each is scored once", cfg.input, len(uris) - len(unique))
            return stat_entries(unique, storage).to_reader()
        pages = entry_batches(source, storage)
        first = next(pages)                   # a missing folder or bucket fails here, not mid-join
        return pa.RecordBatchReader.from_batches(ENTRY_SCHEMA, itertools.chain([first], pages))
    except (OSError, FileNotFoundError) as e:
        raise SystemicFailure(f"cannot list input {cfg.input}: {str(e).splitlines()[0]}") from e


def check_listed(cfg: ScoreConfig, listed: int) -> None:
    """An S3 prefix with no object is a mistake (a wrong bucket or prefix) and stops the job;
    an existing but empty folder is 0 inputs, with a warning."""
    source = absolute_uri(cfg.input)
    if listed == 0 and is_s3(source) and not source.endswith((".parquet", ".csv")):
        raise SystemicFailure(f"input {cfg.input} holds no object: check the bucket and the prefix")
    if listed == 0:
        log.warning("input %s is empty: nothing to score", cfg.input)


def is_inventory(source: str, storage) -> bool:
    """An S3 Inventory report: a .parquet or .csv whose columns include bucket and key (a cxr
    manifest has a uri column instead)."""
    if not source.endswith((".parquet", ".csv")):
        return False
    import pyarrow.parquet as pq

    fs, path = filesystem_for(source, storage)
    if source.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            lines = f.read(4096).decode("utf-8", "replace").splitlines()
        names = [n.strip().strip('"') for n in (lines[0] if lines else "").split(",")]
    else:
        names = pq.read_schema(fs.open_input_file(path)).names
    return {"bucket", "key"} <= set(names) and "uri" not in names


def check_writable(output: str, storage) -> None:
    probe = f"{output.rstrip('/')}/_tmp/_probe-{uuid.uuid4().hex}"
    try:
        write_bytes(probe, b"", storage)
        fs, path = filesystem_for(probe, storage)
        fs.delete_file(path)
    except OSError as e:
        raise SystemicFailure(f"output {output} is not writable: {e}") from e


_CAUSE = re.compile(r"^\s*([A-Za-z_.]*(?:Error|Outage|Exception|Failure)): (.+)$")
_RAY_WRAPPERS = ("RayTaskError", "UserCodeException", "RayActorError", "ray.exceptions")


def pipeline_reason(error: BaseException) -> str:
    """The cause of a failed Ray Data pipeline in one line: the innermost ``Type: message``
    line of the chained errors that is not one of Ray's wrappers (Ray's own last line is a hint
    about retry settings)."""
    found = None
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        for line in str(chain).splitlines():
            match = _CAUSE.match(line)
            if match and not match.group(1).startswith(_RAY_WRAPPERS):
                found = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
        chain = chain.__cause__ or chain.__context__
    lines = str(error).strip().splitlines()
    return (found or (lines[-1] if lines else type(error).__name__))[:400]


@dataclass(frozen=True)
class ScoringPlan:
    cfg: ScoreConfig
    platform: PlatformConfig
    output: str
    job_id: str
    classifier: ModelRef
    segmenter: ModelRef | None
    sizes: tuple[int, int | None]
    fill: int
    listed: int             # inputs in the listing
    deferred: int           # of those to score, left for later runs by --limit
    inputs: pa.Table        # those whose current row is not from these models (ENTRY_SCHEMA)
    why: dict[str, int]     # why they are scored: new, changed, retry, backfill (``why_new``)
    skip: set[str]          # (uri, sha256) keys of rows from before schema version 3
    lease: Lease            # held until ``run_scoring`` ends
    pseudonymiser: Pseudonymiser     # how DICOM patient identifiers are stored


def plan_scoring(cfg: ScoreConfig, platform: PlatformConfig) -> ScoringPlan:
    """Everything before Ray. Takes the output's lease: ``run_scoring`` releases it (call
    ``plan.lease.release()`` if the plan is not run)."""
    storage, uri = platform.storage, platform.tracking_uri
    output = absolute_uri(cfg.output)
    job_id = cfg.job_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    classifier, card, segmenter, seg_card = resolve_models(uri, cfg.classifier, cfg.segmenter)
    check_output_outside_input(output, absolute_uri(cfg.input))
    check_writable(output, storage)
    lease = take_lease(output, job_id, storage, cfg.lease_ttl_s, cfg.lease_wait_s)
    try:
        listing = list_inputs(cfg, storage)
        try:
            finish_compactions(output, storage)
            clear_scratch(output, storage)
        except (OSError, pa.ArrowInvalid) as e:
            raise SystemicFailure(f"cannot read the scores already in {output}: {str(e).splitlines()[0]}") from e
        try:
            decision = decide(listing, output, segmenter, classifier, storage, cfg.limit)
        except (OSError, pa.ArrowInvalid, duckdb.Error) as e:
            raise SystemicFailure(f"cannot decide what is new from input {cfg.input} and the scores in {output}: "
                                  f"{str(e).strip().splitlines()[0]}") from e
        check_listed(cfg, decision.listed)
    except BaseException:
        lease.release()
        raise
    inputs, why = decision.inputs, decision.why
    sizes = (card.preprocessing.letterbox_size, seg_card.preprocessing.letterbox_size if seg_card else None)
    pseudonymiser = Pseudonymiser.from_environment(cfg.keep_identifiers)
    log.info("job %s: %d inputs, %d to score (%s) for %s v%s%s; %s", job_id, decision.listed, inputs.num_rows,
             ", ".join(f"{k} {v}" for k, v in why.items()) or "none", classifier.name, classifier.version,
             f" + {segmenter.name} v{segmenter.version}" if segmenter else "", pseudonymiser.policy)
    return ScoringPlan(cfg, platform, output, job_id, classifier, segmenter, sizes, card.preprocessing.letterbox_fill,
                       decision.listed, decision.unscored - inputs.num_rows, inputs, why, decision.skip, lease,
                       pseudonymiser)


def take_lease(output: str, job_id: str, storage, ttl_s: float, wait_s: float = 0.0) -> Lease:
    """The output's lease, or a ``SystemicFailure`` naming the job that holds it."""
    lease = Lease(output, job_id, storage, ttl_s)
    try:
        lease.acquire(wait_s)
    except LeaseHeld as e:
        raise SystemicFailure(str(e)) from e
    except OSError as e:
        raise SystemicFailure(f"cannot take the lease of output {output}: {str(e).splitlines()[0]}") from e
    return lease


def run_scoring(plan: ScoringPlan) -> dict:
    """Score the plan's new inputs (Ray must be up if there are any), then release the lease;
    returns the summary of what this job wrote."""
    try:
        return _run(plan)
    finally:
        plan.lease.release()


def _run(plan: ScoringPlan) -> dict:
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources, TaskPoolStrategy

    cfg, storage = plan.cfg, plan.platform.storage
    run_date = datetime.now(timezone.utc).date().isoformat()
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    # Decoding runs in its own tasks, beside the model actors: Ray Data fuses a task stage into
    # an actor stage whose pool size equals the task stage's, and a fused actor would decode
    # and infer in turn on one core.
    decode_tasks = cfg.decode_tasks or 2 * cfg.actors
    if decode_tasks == cfg.actors:
        decode_tasks += 1
    if plan.inputs.num_rows and cfg.object_store_mb:
        # Without a cap, decoding outruns the models and Ray Data lets decoded blocks queue up to
        # its share of the object store (650 MiB seen on 2 cores): memory grew with the run.
        options = ray.data.DataContext.get_current().execution_options
        options.resource_limits = ExecutionResources.for_limits(object_store_memory=cfg.object_store_mb * 2**20)
    sink = AtomicParquetSink(plan.output, run_date, plan.job_id, storage, cfg.rows_per_file)
    if plan.inputs.num_rows:      # nothing new: no decode task, no model actor
        ds = ray.data.from_items(plan.inputs.to_pylist())
        ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=16,
                            fn_kwargs={"sizes": plan.sizes, "fill": plan.fill, "skip": plan.skip,
                                       "max_bytes": int(cfg.max_file_mb * 2**20), "storage": storage,
                                       "max_unreadable_share": cfg.max_unreadable_share,
                                       "pseudonymiser": plan.pseudonymiser,
                                       "device_jpeg": cfg.use_gpu if cfg.device_decode is None else cfg.device_decode},
                            compute=TaskPoolStrategy(size=decode_tasks))
        ds = ds.map_batches(
            ScoringPredictor, batch_format="numpy", batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=cfg.actors), num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0,
            num_cpus=cfg.cpus_per_actor,
            # Ray Data's default restarts a dead actor forever and retries its batch forever:
            # a batch that kills its actor every time would never end the night. Ray 2.60 has no
            # named parameter for this; these remote arguments are deprecated for Ray 2.64 (a
            # DeprecationWarning, hidden outside tests): an upgrade must find their successor.
            max_restarts=cfg.actor_restarts, max_task_retries=3 if cfg.actor_restarts else 0,
            fn_constructor_kwargs={"tracking_uri": plan.platform.tracking_uri,
                                   "segmenter": plan.segmenter.__dict__ if plan.segmenter else None,
                                   "classifier": plan.classifier.__dict__, "heatmap_size": cfg.heatmap_size,
                                   "quality": {"no_lungs": cfg.no_lung_fraction, "low": cfg.min_lung_fraction,
                                               "high": cfg.max_lung_fraction},
                                   "job_id": plan.job_id, "threads": cfg.torch_threads or max(1, int(cfg.cpus_per_actor)),
                                   "use_gpu": cfg.use_gpu, "cpu_bf16": cfg.cpu_bf16})
        try:
            ds.write_datasink(sink)
        except Exception as e:  # a task failed beyond Ray's retries: storage down, a model that cannot run
            # Parts committed so far stay valid; the next run scores only what is missing.
            raise SystemicFailure(f"pipeline failed (committed parts are kept; rerun to resume): "
                                  f"{pipeline_reason(e)}") from e
    seconds = time.perf_counter() - started
    if plan.lease.lost:
        raise SystemicFailure(f"the lease of {plan.output} was lost while the job ran ({plan.lease.lost}): "
                              "its rows are committed, but another job may have written beside it")
    wrote = add_up(sink.summary.values())
    # Read back while the lease is held, so no compaction has merged the night's parts away.
    try:
        night = read_night(plan.output, sorted(sink.summary), storage)
    except (OSError, pa.ArrowInvalid) as e:     # the rows are committed; monitoring says it could not judge
        log.warning("could not read the night's parts back for monitoring: %s", e)
        night = None
    seg = plan.segmenter
    return {"job_id": plan.job_id, "inputs": plan.listed, "deferred": plan.deferred,
            "already_scored": plan.listed - plan.deferred - wrote["rows"], "scored": wrote["rows"], "why": plan.why,
            "parts": len(sink.summary), "by_status": wrote["status"], "by_label": wrote["label"],
            "screen_positive": wrote["screen_positive"],
            "seconds": seconds, "images_per_s": wrote["rows"] / seconds if seconds > 0 else 0.0,
            "started_at": started_at, "output": plan.output,
            "segmenter": f"{seg.name} v{seg.version}" if seg else "none",
            "classifier": f"{plan.classifier.name} v{plan.classifier.version}",
            "classifier_uri": plan.classifier.pinned_uri, "night": night,
            "bytes_read": int(pc.sum(plan.inputs["source_size"]).as_py() or 0) if plan.inputs.num_rows else 0}
