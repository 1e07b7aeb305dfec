"""Configuration: one frozen dataclass per job, YAML defaults, CLI overrides; and the platform
settings in ``mlflow.yaml`` (tracking URI, storage endpoint, model names).

Precedence, lowest first: the dataclass defaults (the one source of defaults) < ``--config
FILE`` (e.g. a preset in ``cxr/configs/presets/``) < command-line flags. The resolved config is
what gets saved and logged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from cxr.data.storage import StorageConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SAMPLE_DATA = REPO_ROOT / "data" / "sample"

T = TypeVar("T")


def default_data_root() -> str:
    """``$CXR_DATA``, else ``../shared/data`` beside the repo, else the shipped sample."""
    if os.environ.get("CXR_DATA"):
        return os.environ["CXR_DATA"]
    shared = (REPO_ROOT / ".." / "shared" / "data").resolve()
    return str(shared if shared.is_dir() else SAMPLE_DATA)


def option(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrepareDataConfig:
    """``cxr prepare-data``: Parquet manifests with patient-grouped splits."""

    NAME: ClassVar[str] = "prepare_data"
    data_root: str = option("", "curated data root (kermany/, covid/, lungseg/); default $CXR_DATA, "
                                "else ../shared/data, else the shipped sample")
    out: str = option("out/manifests", "output folder or s3:// prefix for the manifests")
    csv: str | None = option(None, "build one manifest from a CSV with path,label,patient_id[,source] instead")
    images: str | None = option(None, "build one unlabeled manifest from a folder or s3:// prefix instead")
    seed: int = option(1234, "seed of the split; the same seed gives the same split")
    val_fraction: float = option(0.1, "share of patients in val (multiple of 0.05)")
    test_fraction: float = option(0.2, "share of patients in test (multiple of 0.05)")
    source_val_fraction: float = option(0.1, "share of kermany/train patients held out as val for pretraining")
    source_exclude_shared_patients: bool = option(
        True, "leave out of pretraining the kermany/train images whose patient id is also in kermany/test")
    threads: int = option(16, "threads reading files to hash them")

    def resolved_data_root(self) -> Path:
        return Path(self.data_root or default_data_root()).expanduser().resolve()


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """``cxr train-segmenter``: a lung UNet trained with Ray Train, logged and registered in MLflow."""

    NAME: ClassVar[str] = "train_segmenter"
    manifest: str = option("out/manifests/lungseg.parquet", "lungseg manifest (uri, mask_uri, source, split)")
    model: str = option("unet-resnet34", "architecture name (cxr.models registry)")
    image_size: int = option(256, "letterbox size in px")
    epochs: int = option(60, "training epochs")
    batch_size: int = option(16, "batch size per worker")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to 0)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    num_workers: int = option(2, "Ray Train workers")
    use_gpu: bool = option(False, "one GPU per worker, bf16 autocast")
    loader_workers: int = option(2, "DataLoader processes per worker")
    max_train_images: int | None = option(None, "use at most this many training images (quick runs)")
    seed: int = option(0, "random seed")
    dilation_px: int = option(3, "dilation of the lung mask when it is applied, recorded in the card")
    register: bool = option(True, "register the best model as cxr-segmenter")
    run_name: str | None = option(None, "MLflow run name")
    storage_path: str = option("out/ray", "Ray Train results and checkpoints (local folder or s3://)")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Shared by ``cxr pretrain`` and ``cxr finetune``: a classifier trained by Ray Train in up
    to two stages (each: epochs, learning rate, trainable top-level modules); the checkpoint
    with the lowest validation loss is kept."""

    NAME: ClassVar[str] = "classifier"
    manifest: str = option("out/manifests/tasks/source.parquet", "task manifest (uri, label, split)")
    classes: tuple[str, ...] = option(("normal", "bacterial", "viral"), "class names, in output order")
    model: str = option("resnet50", "architecture name (cxr.models registry)")
    image_size: int = option(224, "letterbox size in px")
    batch_size: int = option(32, "batch size per worker")
    dropout: float = option(0.5, "dropout before the final linear layer")
    weight_decay: float = option(0.0, "Adam weight decay")
    stage1_epochs: int = option(100, "epochs of stage 1")
    stage1_lr: float = option(1e-3, "Adam learning rate of stage 1")
    stage1_trainable: tuple[str, ...] = option(("all",), "modules trained in stage 1 (names, or all)")
    stage2_epochs: int = option(0, "epochs of stage 2 (0: one stage)")
    stage2_lr: float = option(1e-4, "Adam learning rate of stage 2")
    stage2_trainable: tuple[str, ...] = option(("layer3", "layer4", "fc"), "modules trained in stage 2")
    lr_step_epochs: int = option(5, "multiply the learning rate by lr_gamma every this many epochs")
    lr_gamma: float = option(0.9, "learning-rate decay factor")
    class_weighted: bool = option(True, "class-weighted cross entropy, w_i = N / (C * n_i)")
    augment: bool = option(True, "random rotation, scaling and brightness/contrast (on the training device)")
    photometric: bool = option(False, "also random gamma, blur or sharpening, and noise, against archive style "
                                      "(with augment)")
    archive_balanced: bool = option(False, "weight each training image by 1 / its archive's image count, so every "
                                           "archive weighs the same (manifests with an archive column)")
    init_weights: str | None = option(None, "initialise from a local state_dict file (.safetensors/.pth), e.g. ImageNet")
    num_workers: int = option(2, "Ray Train workers")
    use_gpu: bool = option(False, "one GPU per worker, bf16 autocast, channels_last")
    max_train_images: int | None = option(None, "use at most this many training images (quick runs)")
    load_threads: int = option(8, "threads decoding images before training")
    seed: int = option(0, "random seed")
    run_name: str | None = option(None, "MLflow run name")
    storage_path: str = option("out/ray", "Ray Train results and checkpoints (local folder or s3://)")
    time_limit_s: float | None = option(None, "stop after the epoch during which this many seconds of training "
                                              "passed, keeping the best checkpoint so far (a GPU lease's clock)")


@dataclass(frozen=True)
class PretrainConfig(ClassifierTrainConfig):
    """``cxr pretrain``: the source task (kermany/train, 3 classes), the paper's recipe."""

    NAME: ClassVar[str] = "pretrain"


@dataclass(frozen=True)
class FinetuneConfig(ClassifierTrainConfig):
    """``cxr finetune``: by default the screening recipe, the one the leave-one-archive-out
    table chose (docs/RESULTS.md): 4 classes on the labelled adults of every archive plus
    Kermany's children (``screen-4class``), whole images, every archive weighted the same,
    photometric augmentation. The paper's recipe (dataset II, lung-masked) is the preset
    ``presets/paper.yaml``. Stage 1 trains only the new dropout + linear head on the frozen
    backbone (the paper freezes "the first five modules"); stage 2 unfreezes layer3 and layer4
    at 1e-4. Registers cxr-classifier with its model card."""

    NAME: ClassVar[str] = "finetune"
    manifest: str = option("out/manifests/tasks/screen-4class.parquet",
                           "task manifest (uri, label, split); also dataset2-4class (the paper's), deconfounded-4class")
    classes: tuple[str, ...] = option(("covid", "normal", "bacterial", "viral"), "class names, in output order")
    stage1_epochs: int = option(10, "epochs of stage 1 (the head alone)")
    stage1_trainable: tuple[str, ...] = option(("fc",), "modules trained in stage 1 (names, or all)")
    stage2_epochs: int = option(30, "epochs of stage 2 (0: one stage)")
    pretrain_run: str | None = option(None, "MLflow run id of a cxr pretrain run to start from (else scratch or init_weights)")
    segmenter: str | None = option(None, "segmenter used for lung masking (the paper's: "
                                         "models:/cxr-segmenter@champion); none: whole images")
    dilation_px: int | None = option(None, "lung-mask dilation (default: the segmenter card's)")
    register: bool = option(True, "register the best model as cxr-classifier")
    n_boot: int = option(1000, "bootstrap resamples for the test-set confidence intervals")
    screening_specificity: float = option(
        0.85, "COVID-vs-rest operating point: after temperature scaling on the validation split, the threshold "
              "keeping this specificity in every archive of it (its adult images where it has enough), reported "
              "on the test split and kept in the card")
    archive_balanced: bool = option(True, "weight each training image by 1 / its archive's image count, so every "
                                          "archive weighs the same (manifests with an archive column)")
    photometric: bool = option(True, "also random gamma, blur or sharpening, and noise, against archive style "
                                     "(with augment)")
    qc_views: str | None = option("out/manifests/views.parquet",
                                  "lateral films and CT slices (cxr prepare-data's views.parquet: its train and val "
                                  "rows) that the registered quality control learns its lateral and ct_slice flags "
                                  "from; none, or a missing file, leaves those flags out")
    tuned_by: str | None = option(None, "the tuning study and trial these settings come from (cxr tune writes it "
                                        "into the config it chooses; the card and run name it)")


@dataclass(frozen=True)
class TuneJobConfig:
    """``cxr tune``: Optuna (through Ray Tune) over the fine-tuning learning rates, dropout and
    weight decay, with ASHA early stopping; the best config is written as a finetune YAML."""

    NAME: ClassVar[str] = "tune"
    finetune_config: str | None = option(None, "finetune YAML the trials start from (over finetune's defaults)")
    num_samples: int = option(20, "trials in the study (a resumed study runs only the missing ones)")
    max_concurrent: int = option(1, "trials at once")
    study_name: str = option("cxr-finetune", "Optuna study name")
    study_storage: str = option("sqlite:///out/tune/optuna.db", "Optuna storage URL: the study persists and resumes here")
    stage1_lr_range: tuple[float, ...] = option((1e-4, 1e-2), "log-uniform range of stage1_lr")
    stage2_lr_range: tuple[float, ...] = option((1e-5, 1e-3), "log-uniform range of stage2_lr")
    dropout_range: tuple[float, ...] = option((0.0, 0.7), "uniform range of dropout")
    weight_decay_range: tuple[float, ...] = option((1e-6, 1e-2), "log-uniform range of weight_decay")
    grace_epochs: int = option(2, "ASHA: epochs every trial runs before it may be stopped")
    best_config_out: str = option("out/tune/best-finetune.yaml", "where the best config is written (a finetune YAML)")
    run_name: str | None = option(None, "MLflow run name of the study")
    storage_path: str = option("out/ray", "Ray Tune results (local folder or s3://)")


@dataclass(frozen=True)
class EvaluateConfig:
    """``cxr evaluate``: metrics with 95% bootstrap intervals, plots and Grad-CAM overlays of a
    registered classifier on any labeled manifest; JSON + PNG, logged to MLflow."""

    NAME: ClassVar[str] = "evaluate"
    manifest: str = option("out/manifests/tasks/dataset2-4class.parquet", "labeled manifest (uri, label[, split, age_group])")
    classifier: str = option("models:/cxr-classifier@champion", "registered classifier: models:/NAME@ALIAS or models:/NAME/VERSION")
    segmenter: str | None = option(None, "segmenter for lung masking (default: the one named in the classifier's card)")
    split: str | None = option("test", "evaluate only this split (none: every row)")
    out: str = option("out/evaluate", "folder for metrics.json and the plots")
    n_boot: int = option(1000, "bootstrap resamples")
    seed: int = option(0, "bootstrap seed")
    batch_size: int = option(32, "inference batch size")
    cam_examples: int = option(4, "Grad-CAM overlays of this many correct and this many wrong cases")
    load_threads: int = option(8, "threads decoding images")
    run_name: str | None = option(None, "MLflow run name")


@dataclass(frozen=True)
class ScoreConfig:
    """``cxr score``: stream X-rays from a folder, an s3:// prefix or a manifest through the
    registered segmenter and classifier (Ray Data), and write one Parquet row per input, with
    the prediction, a Grad-CAM heatmap, quality flags and lineage. Incremental: inputs already
    scored with the same bytes and model versions are skipped."""

    NAME: ClassVar[str] = "score"
    input: str = option("s3://cxr-demo/archive", "folder, s3:// prefix, a .parquet manifest with a uri column, or an "
                                                 "S3 Inventory report (.parquet or .csv with bucket, key, size, "
                                                 "last_modified_date, e_tag columns: no object is listed or asked)")
    output: str = option("out/scores", "output folder or s3:// prefix (Parquet, partitioned by scored_date)")
    segmenter: str | None = option(
        "models:/cxr-segmenter@champion", "segmenter for the lung-area quality signal of a classifier trained "
        "without lung masks (none: no quality signal); a lung-masked classifier always uses the segmenter its card "
        "pins, and a screen the one it was built with")
    classifier: str = option("models:/cxr-screen@champion", "registered screen (its classifier and segmenter, as "
                                                               "promoted) or classifier (models:/NAME@ALIAS or /VERSION)")
    batch_size: int = option(32, "images per model batch")
    actors: int = option(1, "model actors")
    use_gpu: bool = option(False, "run the models on GPUs (bf16)")
    gpus_per_actor: float = option(1.0, "GPU share per model actor with use_gpu; below 1, several actors share a GPU "
                                        "so their CPU-side work (batch assembly, PNG heatmaps) runs in parallel")
    cpus_per_actor: float = option(1.0, "CPUs Ray reserves per model actor")
    torch_threads: int | None = option(None, "torch threads per model actor (default: cpus_per_actor); may exceed "
                                             "it, so the decode tasks keep CPUs to run on")
    cpu_bf16: bool = option(False, "bf16 autocast on CPU too (CPUs with AVX512-BF16/AMX; measure with cxr benchmark)")
    device_decode: bool | None = option(None, "decode baseline JPEGs (files and DICOM frames) in batches on the "
                                              "model's device (default: with use_gpu); the decode tasks only read "
                                              "headers for them (cxr.data.gpu_decode)")
    decode_tasks: int | None = option(None, "parallel decode tasks (default: 2 per model actor; never equal to "
                                            "actors, or Ray would fuse decoding into the model actors)")
    heatmap_size: int = option(64, "side of the stored Grad-CAM heatmap (uint8 PNG)")
    object_store_mb: int = option(512, "cap on the pipeline's Ray object store use (decoded images waiting "
                                       "for the models), so memory stays flat as the archive grows; "
                                       "0: Ray Data's default (a share of the object store)")
    min_lung_fraction: float = option(0.08, "flag an image whose lung area fraction is below this")
    max_lung_fraction: float = option(0.50, "flag an image whose lung area fraction is above this")
    no_lung_fraction: float = option(0.01, "below this lung fraction: no lungs found")
    max_file_mb: float = option(64.0, "files larger than this are error rows, never read whole")
    keep_identifiers: bool = option(False, "store DICOM patient identifiers (PatientID, AccessionNumber) as they are; by "
                                           "default they are pseudonymised with HMAC-SHA256 under $CXR_PSEUDONYM_KEY, "
                                           "or left out where it is not set")
    max_unreadable_share: float = option(
        0.5, "stop the job when storage errors (after retries) hit more than this share of a decode batch of "
             "16 (and at least 2 inputs): the store is failing, not the files; below it, each is an error row")
    limit: int | None = option(None, "score at most this many new inputs in this run (quick runs, or a backlog "
                                     "worked through night by night)")
    job_id: str | None = option(None, "job id recorded in every row (default: a new one)")
    rows_per_file: int = option(512, "rows per Parquet part (at least; the job's last parts may hold fewer): "
                                     "more rows, fewer files; a killed job redoes at most this many per write task")
    lease_ttl_s: float = option(120.0, "a job holds the output's lease while it runs, renewing it every third of "
                                       "this; a lease without a heartbeat for this long is stale (at once if the "
                                       "holder's process on this host is gone)")
    lease_wait_s: float = option(0.0, "wait this long for another job's lease to end or go stale before giving "
                                      "up (0: exit 1 at once; a retried cluster job should wait over lease_ttl_s)")
    actor_restarts: int = option(0, "times Ray restarts a model actor that died (a lost node, an out-of-memory "
                                    "kill); 0: the job stops with the reason, its committed parts kept, and the "
                                    "next run resumes. Above 0, Ray logs an E line per actor on healthy runs too "
                                    "(its constructor arguments live in the object store)")
    drift_psi: float = option(0.25, "population stability index above which a monitored measure (COVID-19 "
                                    "probability, lung fraction, each quality-control score, the flagged and "
                                    "screen-positive shares) counts as drifted from the model's reference, if the "
                                    "chi-square test agrees (--drift-alpha); 0.25 reads as a major shift")
    drift_alpha: float = option(0.001, "p-value below which the chi-square test of a measure's bin counts against "
                                       "the reference agrees that it drifted; a drifted night exits 3")
    drift_min_images: int = option(30, "nights with fewer scored films than this are not judged for drift")
    max_error_share: float = option(0.2, "a night whose error rows are more than this share of the inputs it "
                                         "scored exits 3 (its rows are all written; 1: never)")


@dataclass(frozen=True)
class CompactConfig:
    """``cxr compact``: merge the small Parquet parts of a scores table into parts of about
    ``--target-rows`` rows, holding the output's lease (a running score job makes it exit).
    Rows are copied unchanged, history included; a compaction killed at any point never shows a
    row twice, and the next one finishes it."""

    NAME: ClassVar[str] = "compact"
    output: str = option("out/scores", "the scores table (folder or s3:// prefix)")
    target_rows: int = option(50_000, "rows per merged part; parts under half of it are merged")
    lease_ttl_s: float = option(120.0, "as for cxr score")
    lease_wait_s: float = option(0.0, "as for cxr score")


@dataclass(frozen=True)
class ReportConfig:
    """``cxr report``: a self-contained HTML review page of scored rows: the summary, every
    screen-positive, the highest COVID probabilities, the flagged, skipped and error rows, with
    Grad-CAM overlays inside the lungs on one colour scale."""

    NAME: ClassVar[str] = "report"
    scores: str = option("out/scores", "output of cxr score (folder or s3:// prefix)")
    out: str = option("out/report.html", "the HTML file to write")
    job_id: str | None = option(None, "report this job's rows (default: the latest night, the current row of every "
                                      "input scored on the latest date, resumed runs included; 'all': every input's "
                                      "current row)")
    top: int = option(24, "images of this many screen-positives, and of the highest-COVID-probability others "
                          "(every screen-positive is listed)")
    max_flagged: int = option(48, "images of at most this many flagged films (every one is listed)")
    image_size: int = option(224, "size of the overlay thumbnails in px")
    trend: int = option(14, "plot the last N monitored nights of this table from MLflow (counts, shares, drift; "
                            "0: none); the page's jobs' drift figures are shown either way")


@dataclass(frozen=True)
class ExportSRConfig:
    """``cxr export-sr``: a scoring job's results for the PACS: one DICOM Structured Report per
    scored DICOM study (TID 1500, highdicom) and a CSV worklist of the screen-positives."""

    NAME: ClassVar[str] = "export_sr"
    scores: str = option("out/scores", "output of cxr score (folder or s3:// prefix)")
    job: str | None = option(None, "export this job's rows (default: the latest night, the current row of every input "
                                   "scored on the latest date, resumed runs included; 'all': every input's current row)")
    out: str = option("out/sr", "folder for the reports (<StudyInstanceUID>.dcm) and worklist.csv")


@dataclass(frozen=True)
class BootstrapConfig:
    """``cxr bootstrap``: make sure the registry has champion models. Where either alias is
    missing, import the validated screen shipped in ``models/`` as ``champion``; without one
    (``--bundle ''``), or with --force, train small models on the shipped sample, register them
    and point ``champion`` at them: what a fresh demo machine needs before ``cxr score``."""

    NAME: ClassVar[str] = "bootstrap"
    bundle: str = option(str(REPO_ROOT / "models" / "cxr-screen"), "the shipped screen bundle imported as champion "
                                                                   "when the registry has none ('' to train instead)")
    data_root: str = option("", "data to train on (default: the shipped sample, data/sample)")
    manifests: str = option("out/manifests-sample", "where its manifests are written")
    segmenter_model: str = option("unet-resnet34", "segmenter architecture")
    segmenter_size: int = option(128, "segmenter letterbox size")
    segmenter_epochs: int = option(20, "segmenter epochs")
    classifier_model: str = option("resnet50", "classifier architecture")
    classifier_size: int = option(224, "classifier letterbox size")
    classifier_epochs: tuple[int, ...] = option((4, 6), "epochs of fine-tuning stage 1 and stage 2")
    num_workers: int = option(1, "Ray Train workers")
    force: bool = option(False, "train small models on the sample and promote them, even if champions exist "
                                "(never the bundle)")
    storage_path: str = option("out/ray", "Ray Train results")


@dataclass(frozen=True)
class BenchmarkConfig:
    """``cxr benchmark``: the scoring pipeline against a naive per-image loop (batch 1, fp32,
    Grad-CAM by backward), the same models and images, in one run: images/s, ratio, peak memory,
    and the pipeline's start-up (to its first scored batch) and steady-state images/s."""

    NAME: ClassVar[str] = "benchmark"
    input: str = option("out/manifests/tasks/dataset2-4class.parquet", "manifest (uri column) or folder of images")
    images: int = option(500, "images to score (fewer local files are repeated as distinct symlinks)")
    naive_images: int | None = option(None, "images for the naive loop (default: the same as images; 0: skip it)")
    segmenter: str | None = option("models:/cxr-segmenter@champion", "segmenter (as cxr score: a lung-masked "
                                                                       "classifier uses the one its card pins)")
    classifier: str = option("models:/cxr-classifier@champion", "registered classifier")
    batch_size: int = option(32, "pipeline batch size")
    actors: int = option(1, "pipeline model actors")
    cpus_per_actor: float = option(1.0, "CPUs Ray reserves per model actor")
    torch_threads: int | None = option(None, "torch threads per model actor (default: cpus_per_actor)")
    cpu_bf16: bool = option(False, "bf16 autocast on CPU in the pipeline")
    decode_tasks: int | None = option(None, "parallel decode tasks (default: as cxr score)")
    use_gpu: bool = option(False, "run the pipeline's models on GPUs")
    gpus_per_actor: float = option(1.0, "GPU share per model actor (as cxr score)")
    object_store_mb: int = option(512, "cap on the pipeline's object store use (as cxr score)")
    out: str = option("out/benchmark", "folder for benchmark.json and the pipeline's scratch output")


@dataclass(frozen=True)
class TrainBenchmarkConfig:
    """``cxr benchmark-train``: images/s of the classifier's training step, taken apart (the
    step alone, with augmentation, with the input pipeline of ``cxr pretrain``) in one Ray Train
    worker on synthetic images: where a pretraining epoch's time goes."""

    NAME: ClassVar[str] = "benchmark_train"
    model: str = option("resnet50", "architecture name (cxr.models registry)")
    image_size: int = option(224, "image size in px")
    batch_size: int = option(32, "batch size (the paper's recipe: 32)")
    steps: int = option(50, "timed steps per measurement")
    warmup_steps: int = option(10, "untimed steps before each measurement (cuDNN autotuning, allocator)")
    use_gpu: bool = option(False, "run the worker on a GPU (bf16 autocast, channels_last, as training)")
    compile: bool = option(False, "also time the step with the model under torch.compile")
    out: str = option("out/benchmark-train", "folder for benchmark_train.json")


@dataclass(frozen=True)
class PromoteConfig:
    """``cxr promote``: gated, audited, reversible promotion of a registered screen version to
    ``champion`` (a classifier version is promoted as its screen; gates and gate set in
    mlflow.yaml, see cxr/gates.py); or ``--rollback`` to the recorded state before the last
    promotion; or ``--unlock``. Exit codes: 0 promoted, rolled back, unlocked or nothing to
    do; 1 refused or aborted, nothing changed (lock held, nothing to roll back to, an unknown
    model or version, a registry call failed); 2 a bad option value; 3 the candidate failed its
    gates, nothing changed."""

    NAME: ClassVar[str] = "promote"
    model: str = option("cxr-screen", "registered model: cxr-screen, cxr-segmenter, or cxr-classifier (its version's "
                                      "screen is promoted)")
    version: str | None = option(None, "the candidate version (default: the one the challenger alias points to)")
    rollback: bool = option(False, "restore the champion recorded before the last promotion not yet rolled back "
                                   "(no evaluation); again, to go further back")
    unlock: bool = option(False, "remove the promotion lock a crashed promotion left (audited)")
    reason: str = option("", "why, for the audit record")
    user: str | None = option(None, "who, for the audit record (default: the login name)")


@dataclass(frozen=True)
class ExportModelConfig:
    """``cxr export-model``: a registered screen or classifier as a self-contained, versioned
    bundle (safetensors weights, card JSON, Markdown card, MLflow files, checksums) that
    ``cxr import-model`` registers in any registry and ``cxr.load`` reads."""

    NAME: ClassVar[str] = "export_model"
    model: str = option("models:/cxr-screen@champion", "registered screen or classifier (models:/NAME@ALIAS or /VERSION)")
    out: str = option("out/bundle", "the bundle: a new folder, or a file ending in .tar")
    dtype: str = option("float32", "weights as float32, bfloat16 or int8 (per-channel, weight-only; see cxr/weights.py)")
    segmenter: str | None = option("models:/cxr-segmenter@champion", "for a classifier trained without lung masks: "
                                   "the segmenter of the quality signal (a lung-masked one brings its own)")
    part_mb: float | None = option(None, "cut a .tar bundle larger than this into NAME.tar.000, .001, ... (e.g. 16 "
                                         "for a transfer of at most 16 MiB per file); import-model takes NAME.tar.000")
    sign_key: str | None = option(None, "sign the bundle (HMAC-SHA256 of its checksums) with the key in this file "
                                        "(at least 32 bytes, e.g. openssl rand -out KEY 32)")


@dataclass(frozen=True)
class ImportModelConfig:
    """``cxr import-model``: verify a bundle (checksums, cards) and register its segmenter,
    classifier and screen in this registry (MLFLOW_TRACKING_URI or mlflow.yaml)."""

    NAME: ClassVar[str] = "import_model"
    bundle: str = option("out/bundle", "bundle folder or .tar from cxr export-model")
    alias: str | None = option(None, "point this alias of all three registered models at the imported versions")
    verify_key: str | None = option(None, "verify the bundle's signature with the key in this file")
    require_signature: bool = option(False, "refuse a bundle that is unsigned or does not verify (needs --verify-key)")


@dataclass(frozen=True)
class RetrainConfig:
    """``cxr retrain``: the scheduled retraining, as one Ray job: prepare-data -> train-segmenter
    (optional) -> pretrain (optional) -> finetune with the tuned config -> evaluate -> register as
    challenger -> promote. Idempotent per data snapshot: a snapshot already retrained is skipped."""

    NAME: ClassVar[str] = "retrain"
    data_root: str = option("", "curated data root (default: $CXR_DATA, else ../shared/data, else the sample)")
    manifests: str = option("out/manifests", "where prepare-data writes the manifests")
    train_segmenter: bool = option(False, "retrain the segmenter too (else use the segmenter champion)")
    pretrain: bool = option(True, "pretrain on the source task first (else fine-tune from scratch or init_weights)")
    segmenter_config: str | None = option(None, "train-segmenter YAML (over its defaults)")
    pretrain_config: str | None = option(None, "pretrain YAML (over its defaults)")
    finetune_config: str | None = option("out/tune/best-finetune.yaml", "finetune YAML, e.g. the one cxr tune wrote")
    promote: bool = option(True, "run the gated promotion of the new classifier (and segmenter)")
    force: bool = option(False, "retrain even if this data snapshot was retrained before")


@dataclass(frozen=True)
class AblationConfig:
    """``cxr ablation``: the paper's tables and the ablation, as repeated ``cxr finetune`` runs
    over seeds; writes a Markdown table of mean +- std (and the per-run JSON) for docs/RESULTS.md."""

    NAME: ClassVar[str] = "ablation"
    finetune_config: str | None = option(None, "finetune YAML every run starts from (e.g. a CPU preset)")
    pretrain_run: str | None = option(None, "MLflow run id of the pretraining run the 'pretrained' variants start from")
    manifests: str = option("out/manifests", "folder of the task manifests")
    variants: tuple[str, ...] = option(
        ("paper-4class", "paper-3class", "scratch-4class", "nomask-4class", "deconfounded-4class"),
        "variants to run (see cxr/workflows/ablation.py for their definitions)")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds: each variant runs once per seed")
    out: str = option("out/ablation", "folder for results.json and table.md")


@dataclass(frozen=True)
class CrossvalConfig:
    """``cxr crossval``: leave-one-archive-out. For each archive a recipe trains on, a fold
    fine-tunes without it, calibrates (temperature) and picks its threshold on the remaining
    archives' validation split, and reports the held-out archive; writes per-image predictions,
    per-fold JSON and a table, worst archive first. Resumable: a finished fold is kept."""

    NAME: ClassVar[str] = "crossval"
    finetune_config: str | None = option(None, "finetune YAML every fold starts from (e.g. a CPU preset)")
    pretrain_run: str | None = option(None, "MLflow run id of the pretraining run every fold starts from")
    manifests: str = option("out/manifests", "folder of the task manifests (tasks/<task>.parquet, tasks/archives)")
    recipes: tuple[str, ...] = option(("paper", "screen"), "recipes to evaluate (cxr/crossval.py RECIPES)")
    segmenter: str = option("models:/cxr-segmenter@champion", "segmenter of the lung-masked recipes (paper)")
    folds: tuple[str, ...] = option((), "only these held-out archives (default: every archive the recipe trains on, "
                                        "then the fold holding none out)")
    min_archive_images: int = option(20, "hold out only archives with at least this many train/val images")
    min_specificity: float = option(0.85, "each validation archive's specificity at each fold's own threshold "
                                          "(the worst-archive rule the per-fold tables report)")
    transfer_specificity: float = option(0.90, "specificity on the folds' out-of-archive adult films without "
                                               "COVID-19 at the registered model's threshold (cxr.crossval)")
    seed: int = option(0, "random seed of every fold")
    n_boot: int = option(1000, "bootstrap resamples for the intervals")
    register: bool = option(False, "register each recipe's fold that holds nothing out as a cxr-classifier version, "
                                   "its card carrying the recipe's cross-archive figures (after its other folds)")
    out: str = option("out/crossval", "folder for predictions, fold results and table.md")


@dataclass(frozen=True)
class CalibrateConfig:
    """``cxr calibrate``: fit a registered screen's (or classifier's) operating point to a site
    from a small labelled sample of its own images: a temperature (when the sample has COVID
    and other images) and the threshold giving the wanted specificity on its negatives. The
    result is registered as a new classifier version, and its screen as a new cxr-screen
    version, whose card records the site, the sample's digest and the figures with intervals."""

    NAME: ClassVar[str] = "calibrate"
    manifest: str = option(None, "the site's labelled sample: a CSV (path,label,patient_id) or a manifest "
                                 "(.parquet); label covid or anything else")
    model: str = option("models:/cxr-screen@champion", "registered screen or classifier to calibrate")
    site: str = option(None, "name of the site, recorded in the card")
    specificity: float = option(0.90, "specificity wanted on the site's negatives")
    alias: str | None = option(None, "point this alias of cxr-screen at the calibrated screen (e.g. site-a)")
    check: str | None = option(None, "more labelled images of the site, kept apart: sensitivity and specificity on "
                                     "them before and after (same formats as --manifest)")
    n_boot: int = option(1000, "bootstrap resamples for the intervals")
    load_threads: int = option(4, "threads decoding the sample")
    out: str | None = option(None, "also write the result as JSON here")


# --- loading -------------------------------------------------------------------------------

def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, typing.get_args(annotation)[0], name)
                     for v in items if v != "")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: expected {annotation.__name__}, got {value!r}") from e
    return value


# The ranges of the numeric options, by name (the same name means the same thing in every job):
# (lowest, highest), either None for no bound. Checked wherever a config is resolved, so a bad
# value is a one-line error before any work starts, never a traceback half-way.
AT_LEAST_ONE = ("batch_size", "epochs", "threads", "load_threads", "num_workers", "n_boot", "actors", "rows_per_file",
                "target_rows", "images", "steps", "num_samples", "max_concurrent", "limit", "top", "max_flagged",
                "segmenter_epochs", "object_store_mb", "max_train_images", "lr_step_epochs", "decode_tasks",
                "torch_threads", "min_archive_images", "drift_min_images")
AT_LEAST_ZERO = ("seed", "stage1_epochs", "stage2_epochs", "loader_workers", "weight_decay", "warmup_steps",
                 "grace_epochs", "naive_images", "lease_wait_s", "dilation_px", "cam_examples", "heatmap_size",
                 "time_limit_s", "actor_restarts", "drift_psi", "trend")
SHARES = ("val_fraction", "test_fraction", "source_val_fraction", "specificity", "min_specificity",
          "screening_specificity", "transfer_specificity", "max_unreadable_share", "min_lung_fraction",
          "max_lung_fraction", "no_lung_fraction", "dropout", "lr_gamma", "drift_alpha", "max_error_share")
POSITIVE = ("lr", "stage1_lr", "stage2_lr", "lease_ttl_s", "part_mb", "max_file_mb", "gpus_per_actor",
            "cpus_per_actor")
RANGES = {**{n: (1, None) for n in AT_LEAST_ONE}, **{n: (0, None) for n in AT_LEAST_ZERO},
          **{n: (0, 1) for n in SHARES}, "image_size": (8, 4096), "segmenter_size": (8, 4096),
          "classifier_size": (8, 4096)}


def check_ranges(values: dict[str, Any]) -> None:
    """Raise ``ValueError`` (one line, naming the option) for a numeric option out of its range."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if name in POSITIVE and value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
        low, high = RANGES.get(name, (None, None))
        if low is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"{flag} must be <= {high}, got {value}")


def load_config(cls: type[T], config_file: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Resolve a job config. Unknown keys fail and list the valid ones; numeric options out of
    range (``RANGES``) fail and name the option."""
    values: dict[str, Any] = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a YAML mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in config_fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.NAME}; valid: {sorted(valid)}")
    coerced = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    check_ranges(coerced)
    return cls(**coerced)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in config_fields(type(cfg))}


def config_to_plain(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON values (tuples as lists): a run's logged ``config.yaml``
    that ``--config`` reads back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config_to_dict(cfg).items()}


# --- platform (mlflow.yaml) ------------------------------------------------------------------

@dataclass(frozen=True)
class PlatformConfig:
    """Tracking, registry and storage settings shared by all jobs (``mlflow.yaml``)."""

    tracking_uri: str
    artifact_location: str | None
    storage: StorageConfig
    experiments: dict[str, str]
    registered_models: dict[str, str]
    aliases: dict[str, str]
    promotion: dict = field(default_factory=dict)


def load_platform(path: str | None = None) -> PlatformConfig:
    """Read ``mlflow.yaml`` (``$CXR_PLATFORM_CONFIG`` or the repo's). Environment wins:
    ``MLFLOW_TRACKING_URI`` and ``CXR_S3_ENDPOINT`` point the same config at other services.
    """
    path = path or os.environ.get("CXR_PLATFORM_CONFIG") or str(REPO_ROOT / "mlflow.yaml")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    storage_raw = dict(raw.get("storage") or {})
    if "CXR_S3_ENDPOINT" in os.environ:
        storage_raw["s3_endpoint"] = os.environ["CXR_S3_ENDPOINT"] or None
    return PlatformConfig(
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or raw["tracking_uri"],
        artifact_location=raw.get("artifact_location"),
        storage=StorageConfig(**storage_raw),
        experiments=dict(raw.get("experiments") or {}),
        registered_models=dict(raw.get("registered_models") or {}),
        aliases=dict(raw.get("aliases") or {}),
        promotion=dict(raw.get("promotion") or {}),
    )
