"""Record in a bundle's classifier card what it learnt from (archives, image sha256, patient
digests: ``cxr.card.DatasetDigest``), for a bundle whose card predates those fields, so
promotion can check it against the gate set. The manifest must be the one the card names
(its digest is checked); the weights are not touched, the checksums are rewritten.

    python -m experiments.record_training_set --bundle models/cxr-screen \\
        --manifest out/crossval/screen/all-train.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

from cxr.card import DatasetDigest
from cxr.data.manifest import manifest_digest
from cxr.model_card import screen_markdown
from cxr.package import CARD, MARKDOWN, read_screen, write_checksums


def record(bundle: Path, manifest: Path) -> DatasetDigest:
    classifier, segmenter, _ = read_screen(bundle)          # checks the bundle first
    frame = pd.read_parquet(manifest)
    digest = manifest_digest(frame)
    named = [d for d in classifier.card.training_data if d.sha256 == digest]
    if not named:
        raise SystemExit(f"{manifest} (digest {digest[:12]}) is not the training data the card names: "
                         f"{[(d.name, d.sha256[:12]) for d in classifier.card.training_data]}")
    recorded = DatasetDigest.of(named[0].name, named[0].uri, digest, len(frame), frame)
    card = dataclasses.replace(classifier.card, training_data=tuple(
        recorded if d.sha256 == digest else d for d in classifier.card.training_data)).validate()
    (bundle / "classifier" / CARD).write_text(card.to_json())
    (bundle / MARKDOWN).write_text(screen_markdown(dataclasses.replace(classifier, card=card), segmenter))
    write_checksums(bundle)
    read_screen(bundle)
    return recorded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a bundle folder (models/cxr-screen)")
    p.add_argument("--manifest", required=True, help="the training manifest its card names")
    args = p.parse_args(argv)
    d = record(Path(args.bundle), Path(args.manifest))
    print(f"{args.bundle}: recorded {len(d.images)} images, {len(d.patients)} patients of {d.archives}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
