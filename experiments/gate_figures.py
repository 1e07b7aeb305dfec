"""The promotion gates applied to screens, for docs/RESULTS.md: each candidate's gate set
(what it never learnt from), its screen-flag figures there at its own operating point with
its QC, where its threshold comes from, and the decision ``cxr promote`` would take on the
gates of mlflow.yaml (without a champion to compare with). A candidate is a bundle folder or
a registered ``models:/...`` screen or classifier; ``--edited-threshold T`` adds the first
bundle with its card's threshold set to T, as a tampered bundle would carry it.

    python -m experiments.gate_figures --archives out/manifests/tasks/archives.parquet \\
        --candidate models/cxr-screen --candidate models:/cxr-classifier/4 \\
        --edited-threshold 0.0001 --out docs/results/gates.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from cxr.config import load_platform
from cxr.data.manifest import read_manifest
from cxr.gates import GateSetError, assess, judge
from cxr.screen import Screen


def load_screen(candidate: str, platform) -> Screen:
    from cxr.workflows.screen import load

    return load(candidate, platform.tracking_uri, "cpu", storage=platform.storage)


def with_threshold(screen: Screen, threshold: float) -> Screen:
    """The same screen with its card's threshold edited, as in a tampered bundle."""
    card = screen.classifier.card
    card = dataclasses.replace(card, operating_point=dataclasses.replace(card.operating_point, threshold=threshold))
    return Screen(dataclasses.replace(screen.classifier, card=card), screen.segmenter, screen.device,
                  storage=screen.storage)


def figures_of(name: str, screen: Screen, archives, rules: dict, storage) -> dict:
    try:
        a = assess(screen, archives, rules, storage)
    except GateSetError as e:
        return {"candidate": name, "refused": str(e)}
    gates, failures = judge(a.figures, a.evidence, rules)
    return {"candidate": name, **a.to_dict(), "gates": gates, "passed": not failures, "reasons": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archives", default="out/manifests/tasks/archives.parquet", help="the archives task manifest")
    p.add_argument("--candidate", action="append", required=True, help="bundle folder or models:/ URI (repeat)")
    p.add_argument("--edited-threshold", type=float, default=None, help="also the first candidate at this threshold")
    p.add_argument("--out", default="docs/results/gates.json")
    args = p.parse_args(argv)
    platform = load_platform()
    rules = {**platform.promotion.get("screen", {}), "n_boot": platform.promotion.get("n_boot", 1000),
             "seed": platform.promotion.get("seed", 0)}
    archives = read_manifest(args.archives, platform.storage)
    results = []
    for i, candidate in enumerate(args.candidate):
        screen = load_screen(candidate, platform)
        results.append(figures_of(candidate, screen, archives, rules, platform.storage))
        if i == 0 and args.edited_threshold is not None:
            results.append(figures_of(f"{candidate}, threshold edited to {args.edited_threshold}",
                                      with_threshold(screen, args.edited_threshold), archives, rules, platform.storage))
    for r in results:
        f = r.get("figures", {})
        line = (f"sens {f['sensitivity']['value']:.3f} [{f['sensitivity']['low']:.3f}] n={f['sensitivity']['n']}, "
                f"spec {f['specificity']['value']:.3f} [{f['specificity']['low']:.3f}] n={f['specificity']['n']}"
                if f.get("sensitivity") and f.get("specificity") else "")
        print(f"{r['candidate']}: {'PASS' if r.get('passed') else 'REFUSED'} {line} {'; '.join(r.get('reasons', [r.get('refused', '')]))}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "archives": args.archives, "rules": rules, "results": results}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
