"""The ``cxr`` console script: one subcommand per job, flags generated from the job's config."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
import typing

from cxr.config import (AblationConfig, BenchmarkConfig, BootstrapConfig, CalibrateConfig, CompactConfig,
                        CrossvalConfig, EvaluateConfig, ExportModelConfig, ExportSRConfig, FinetuneConfig, ImportModelConfig,
                        PrepareDataConfig, PretrainConfig, PromoteConfig, ReportConfig, RetrainConfig, ScoreConfig, SegmenterTrainConfig,
                        TrainBenchmarkConfig, TuneJobConfig, config_fields, load_config)

# name -> (config class, job module, one-line help). Job modules are imported only when run,
# so `cxr --help` stays fast.
COMMANDS: dict[str, tuple[type, str, str]] = {
    "prepare-data": (PrepareDataConfig, "jobs.prepare_data",
                     "build Parquet manifests (curated data, a CSV, or a folder/S3 prefix) with patient-grouped splits"),
    "train-segmenter": (SegmenterTrainConfig, "jobs.train_segmenter",
                        "train the lung UNet with Ray Train, log to MLflow, register cxr-segmenter"),
    "pretrain": (PretrainConfig, "jobs.pretrain",
                 "pretrain the classifier on the source task (kermany/train, 3 classes) with Ray Train"),
    "finetune": (FinetuneConfig, "jobs.finetune",
                 "fine-tune (the screening recipe; presets/paper.yaml: the paper's), evaluate, register it"),
    "tune": (TuneJobConfig, "jobs.tune",
             "tune the fine-tuning learning rates, dropout and weight decay with Optuna on Ray Tune"),
    "ablation": (AblationConfig, "jobs.ablation",
                 "the paper's tables and the ablation: finetune over variants x seeds, mean +- std"),
    "calibrate": (CalibrateConfig, "jobs.calibrate",
                  "fit a screen's threshold (and temperature) to a site's labelled sample; register it for that site"),
    "crossval": (CrossvalConfig, "jobs.crossval",
                 "leave-one-archive-out: train without each archive, threshold without it, report on it"),
    "evaluate": (EvaluateConfig, "jobs.evaluate",
                 "evaluate a registered classifier on a labeled manifest: metrics with CIs, plots, Grad-CAM"),
    "export-sr": (ExportSRConfig, "jobs.export_sr",
                  "a scoring job's results for the PACS: one DICOM SR per study (TID 1500) and a CSV worklist"),
    "score": (ScoreConfig, "jobs.score",
              "the nightly job: score a folder, s3:// prefix or manifest into Parquet (predictions, heatmaps, QC)"),
    "compact": (CompactConfig, "jobs.compact",
                "merge a scores table's small Parquet parts into large ones (history kept; holds the output's lease)"),
    "promote": (PromoteConfig, "jobs.promote",
                "gated promotion of a registered version to champion (or --rollback), with an audit record"),
    "export-model": (ExportModelConfig, "jobs.export_model",
                     "write a registered screen or classifier as a portable bundle (weights, cards, checksums)"),
    "import-model": (ImportModelConfig, "jobs.import_model",
                     "verify a bundle and register it (segmenter, classifier, screen) in this registry"),
    "retrain": (RetrainConfig, "jobs.retrain",
                "scheduled retraining: prepare-data -> (segmenter) -> (pretrain) -> finetune -> challenger -> promote"),
    "benchmark": (BenchmarkConfig, "jobs.benchmark",
                  "images/s and peak memory of the scoring pipeline against a naive per-image loop"),
    "benchmark-train": (TrainBenchmarkConfig, "jobs.benchmark_train",
                        "images/s of the classifier's training step, taken apart (step, augmentation, input pipeline)"),
    "bootstrap": (BootstrapConfig, "jobs.bootstrap",
                  "train and promote small champion models on the shipped sample if the registry has none"),
    "report": (ReportConfig, "jobs.report",
               "write the HTML review page of a scoring run (summary, top COVID, flagged, errors)"),
}

DESCRIPTION = """\
cxr: chest X-ray screening. A ResNet50 pretrained on pediatric pneumonia X-rays tells COVID-19 /
normal / bacterial / viral pneumonia apart (on lungs cut out by a UNet in the paper's recipe; on
whole images in the default screening recipe, the UNet giving a lung-area quality signal), and
Grad-CAM shows where it looked. Research use, not for diagnosis.

Settings: each job's defaults (shown by --help), overridden by --config FILE and then by flags.
Services: mlflow.yaml, overridden by MLFLOW_TRACKING_URI and CXR_S3_ENDPOINT."""


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    defaults = load_config(cls)
    for f in config_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)!r})"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from cxr import __version__

    parser = argparse.ArgumentParser(prog="cxr", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}.\n\n{cls.__doc__ or ''}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", help="YAML file of options, applied over the defaults")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        _add_config_flags(p, cls)
    return parser


def config_for(args: argparse.Namespace):
    """The job config that parsed ``cxr COMMAND ...`` arguments resolve to (defaults < --config < flags)."""
    cls = COMMANDS[args.command][0]
    return load_config(cls, args.config, {f.name: getattr(args, f.name) for f in config_fields(cls)})


def mlflow_fail_fast() -> None:
    """An unreachable tracking server fails a job in about 20 s, not MLflow's default 4 minutes
    (7 retries, backoff factor 2, 120 s timeout). The environment still wins."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                        # A job's last line is its outcome: MLflow's "View run at ..." lines are noise there.
                        ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
        os.environ.setdefault(name, value)


def did_you_mean(word: str, choices) -> str:
    """ " (did you mean X?)" for the closest of ``choices``, or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, but a misspelt command or flag is answered with the usage of the
    command it was meant for and the nearest valid name (Python 3.11's argparse prints the
    top-level usage for a subcommand's unknown flag, and suggests nothing)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS and argv and argv[0] == command:
        parser.error(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; see cxr --help")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        own = sub.choices[args.command] if args.command else parser
        flag = next((e for e in extra if e.startswith("-")), extra[0])
        own.error(f"unrecognized arguments: {' '.join(extra)}"
                  f"{did_you_mean(flag.split('=', 1)[0], own._option_string_actions)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else list(argv))
    if not args.command:
        parser.print_help()
        return 2
    _, module_name, _ = COMMANDS[args.command]
    try:
        cfg = config_for(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"cxr {args.command}: {e}\n")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Batch jobs log to files: MLflow's download progress bars would only be noise there.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Nor two "View run" URL lines per MLflow run: a job's summary names the runs it made.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow_fail_fast()
    return importlib.import_module(module_name).main(cfg)


if __name__ == "__main__":
    sys.exit(main())
