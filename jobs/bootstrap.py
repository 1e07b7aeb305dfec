"""``cxr bootstrap``: champion models for a fresh machine. Skips everything if the champions
exist; else imports the validated screen shipped in ``models/cxr-screen`` (README, "The shipped
screen") as ``champion``; without it, or with ``--force``, trains small models on the shipped
sample, registers them and their screen, and points ``champion`` at all three."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr import tracking
from cxr.card import CardError
from cxr.config import (SAMPLE_DATA, BootstrapConfig, FinetuneConfig, PrepareDataConfig, SegmenterTrainConfig,
                        load_config, load_platform)
from cxr.package import PackageError
from cxr.workflows.promotion import alias_version
from cxr.workflows.classifier import finetune
from cxr.workflows.data import prepare_manifests
from cxr.workflows.screen import import_model, register_screen, screen_name
from cxr.workflows.segmenter import train_segmenter
from jobs.runtime import init_ray


def main(cfg: BootstrapConfig) -> int:
    platform = load_platform()
    uri, alias = platform.tracking_uri, platform.aliases["champion"]
    names = platform.registered_models
    current = {kind: alias_version(uri, names[kind], alias) for kind in ("segmenter", "classifier")}
    if all(current.values()) and not cfg.force:
        screen = alias_version(uri, screen_name(platform), alias)
        if not screen:      # a registry from before screens existed
            screen = register_screen(platform, f"models:/{names['classifier']}@{alias}",
                                     f"models:/{names['segmenter']}@{alias}", alias)
        print(f"bootstrap: champions exist ({names['segmenter']} v{current['segmenter']}, "
              f"{names['classifier']} v{current['classifier']}, {screen_name(platform)} v{screen}); nothing to do")
        return 0
    if cfg.bundle and not cfg.force and not Path(cfg.bundle).exists():
        # An installed package without the repo's models/ folder (an image): the old way.
        print(f"bootstrap: no bundle at {cfg.bundle}; training small models on the sample instead", file=sys.stderr)
    elif cfg.bundle and not cfg.force:
        try:
            versions = import_model(platform, cfg.bundle, alias)
        except (PackageError, CardError) as e:
            print(f"cxr bootstrap: {cfg.bundle}: {e}", file=sys.stderr)
            return 2
        print(f"bootstrap: imported {cfg.bundle}; {alias} is now {names['segmenter']} v{versions['segmenter']}, "
              f"{names['classifier']} v{versions['classifier']} and {screen_name(platform)} v{versions['screen']}")
        return 0
    data_root = cfg.data_root or str(SAMPLE_DATA)
    out = Path(cfg.manifests)
    summary = prepare_manifests(PrepareDataConfig(data_root=data_root, out=str(out), threads=4), platform)
    if any(s["patient_leaks"] for s in summary.values()):
        print(f"cxr bootstrap: a patient is in two splits of {out}; see its summary.json", file=sys.stderr)
        return 1
    init_ray()
    seg = train_segmenter(load_config(SegmenterTrainConfig, overrides=dict(
        manifest=str(out / "lungseg.parquet"), model=cfg.segmenter_model, image_size=cfg.segmenter_size,
        epochs=cfg.segmenter_epochs, batch_size=8, num_workers=cfg.num_workers, loader_workers=0,
        run_name="bootstrap-segmenter", storage_path=cfg.storage_path)), platform)
    tracking.set_alias(uri, names["segmenter"], alias, seg["version"])
    stage1, stage2 = (tuple(cfg.classifier_epochs) + (0, 0))[:2]
    # The default (screening) recipe: whole images; the segmenter gives the screen its lung-area QC.
    seg_uri = f"models:/{names['segmenter']}/{seg['version']}"
    cls = finetune(load_config(FinetuneConfig, overrides=dict(
        manifest=str(out / "tasks" / "screen-4class.parquet"), model=cfg.classifier_model,
        image_size=cfg.classifier_size, stage1_epochs=stage1, stage2_epochs=stage2, batch_size=8,
        num_workers=cfg.num_workers, load_threads=2,
        n_boot=200, run_name="bootstrap-classifier", storage_path=cfg.storage_path)), platform)
    tracking.set_alias(uri, names["classifier"], alias, cls["version"])
    screen = register_screen(platform, f"models:/{names['classifier']}/{cls['version']}", seg_uri, alias=alias)
    print(f"bootstrap: trained on {data_root}; {alias} is now {names['segmenter']} v{seg['version']} "
          f"(test Dice {seg['report']['all']['mean']:.3f}), {names['classifier']} v{cls['version']} "
          f"(test accuracy {cls['report']['metrics']['accuracy']['value']:.3f}; a demo model, not a screening one) "
          f"and {screen_name(platform)} v{screen}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["bootstrap", *sys.argv[1:]]))
