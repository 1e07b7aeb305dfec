"""``cxr bootstrap``: champion models for a fresh machine. Skips everything if both aliases exist."""

from __future__ import annotations

import sys
from pathlib import Path

from cxr import tracking
from cxr.promotion import alias_version
from cxr.config import (SAMPLE_DATA, BootstrapConfig, FinetuneConfig, PrepareDataConfig, SegmenterTrainConfig,
                        load_config, load_platform)


def main(cfg: BootstrapConfig) -> int:
    from jobs import finetune, prepare_data, train_segmenter

    platform = load_platform()
    uri, alias = platform.tracking_uri, platform.aliases["champion"]
    names = platform.registered_models
    current = {kind: alias_version(uri, names[kind], alias) for kind in ("segmenter", "classifier")}
    if all(current.values()) and not cfg.force:
        print(f"bootstrap: champions exist ({names['segmenter']} v{current['segmenter']}, "
              f"{names['classifier']} v{current['classifier']}); nothing to do")
        return 0
    data_root = cfg.data_root or str(SAMPLE_DATA)
    out = Path(cfg.manifests)
    if prepare_data.main(PrepareDataConfig(data_root=data_root, out=str(out), threads=4)) != 0:
        return 1
    seg = train_segmenter.run(load_config(SegmenterTrainConfig, overrides=dict(
        manifest=str(out / "lungseg.parquet"), model=cfg.segmenter_model, image_size=cfg.segmenter_size,
        epochs=cfg.segmenter_epochs, batch_size=8, num_workers=cfg.num_workers, loader_workers=0,
        run_name="bootstrap-segmenter", storage_path=cfg.storage_path)))
    tracking.set_alias(uri, names["segmenter"], alias, seg["version"])
    stage1, stage2 = (tuple(cfg.classifier_epochs) + (0, 0))[:2]
    cls = finetune.run(load_config(FinetuneConfig, overrides=dict(
        manifest=str(out / "tasks" / "dataset2-4class.parquet"), model=cfg.classifier_model,
        image_size=cfg.classifier_size, stage1_epochs=stage1, stage2_epochs=stage2, batch_size=8,
        segmenter=f"models:/{names['segmenter']}/{seg['version']}", num_workers=cfg.num_workers, load_threads=2,
        n_boot=200, run_name="bootstrap-classifier", storage_path=cfg.storage_path)))
    tracking.set_alias(uri, names["classifier"], alias, cls["version"])
    print(f"bootstrap: trained on {data_root}; {alias} is now {names['segmenter']} v{seg['version']} "
          f"(test Dice {seg['report']['all']['mean']:.3f}) and {names['classifier']} v{cls['version']} "
          f"(test accuracy {cls['report']['metrics']['accuracy']['value']:.3f}; a demo model, not a screening one)")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["bootstrap", *sys.argv[1:]]))
