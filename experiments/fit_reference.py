"""Store a screen bundle's reference distributions (``cxr.monitoring``): what its classifier,
quality control and segmenter answer on the validation films it was trained against, through
the scoring path. The nights ``cxr score`` monitors are compared with them.

    python -m experiments.fit_reference --bundle models/cxr-screen --manifest out/crossval/screen/all-train.parquet

``cxr finetune --register`` stores a reference itself; this script gives one to a bundle built
before (the shipped screen), or refits it after its quality control changed (``fit_qc``).
Writes ``reference.json`` into the bundle's ``classifier/`` and its checksums.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from cxr.package import read_screen, write_checksums, write_reference
from cxr.workflows.monitor import fit_screen_reference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/cxr-screen", help="the screen bundle (folder), written in place")
    p.add_argument("--manifest", default="out/crossval/screen/all-train.parquet",
                   help="the classifier's training manifest (the card's training_data), with a split column")
    p.add_argument("--split", default="val", help="the rows whose films make the reference")
    args = p.parse_args(argv)

    bundle = Path(args.bundle)
    classifier, segmenter, _ = read_screen(bundle)
    rows = pd.read_parquet(args.manifest)
    rows = rows[rows["split"] == args.split]
    if rows.empty:
        print(f"{args.manifest} has no {args.split} rows", file=sys.stderr)
        return 1
    names = {d.name: d for d in classifier.card.training_data}
    name = Path(args.manifest).stem
    if name not in names:
        print(f"warning: {args.manifest} is not among the card's training data ({sorted(names)})", file=sys.stderr)
    reference = fit_screen_reference(classifier, segmenter, rows["uri"].tolist(), None,
                                     f"{name} split {args.split}")
    write_reference(bundle / "classifier", reference)
    write_checksums(bundle)
    for measure, d in reference.measures.items():
        print(f"{measure}: {len(d.counts)} bins over {d.n} films")
    return 0


if __name__ == "__main__":
    sys.exit(main())
