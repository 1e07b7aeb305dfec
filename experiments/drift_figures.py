"""What the nightly drift check says about the shipped screen on nights it could meet: films
like its validation films but never trained on (it should stay quiet), a hospital it never saw
(TBX11K), a children's archive, a scanner change (the same films with washed-out midtones) and
lateral films and CT slices sent by mistake.

    python -m experiments.drift_figures --out docs/results/drift.json

Each night is scored through the screen's scoring path (``Screen.predict``) and compared with
the reference in the bundle (``cxr.monitoring.compare``) under ``cxr score``'s default limits.
The in-distribution nights repeat with several seeds: how often an unshifted night would raise
a false alarm.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr.config import ScoreConfig
from cxr.monitoring import Limits, answers_table, compare, measure_values
from cxr.package import read_screen
from cxr.screen import Screen


def unseen_like_validation(manifests: Path, trained: set[str], mix: dict[str, int], seed: int) -> list[str]:
    """Films of the screen's own archives it never trained on, in its validation mix."""
    rows = pd.concat([pd.read_parquet(manifests / f"{n}.parquet") for n in ("kermany", "covid", "lungseg", "jsrt")])
    rows = rows[~rows["sha256"].isin(trained)]
    rng = np.random.default_rng(seed)
    out = []
    for archive, n in mix.items():
        pool = rows[rows["archive"] == archive]["uri"].tolist()
        out += [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)]
    return out


def sample(manifest: Path, n: int, seed: int, where=None) -> list[str]:
    rows = pd.read_parquet(manifest)
    if where is not None:
        rows = rows[where(rows)]
    rng = np.random.default_rng(seed)
    return [rows["uri"].iloc[i] for i in rng.choice(len(rows), min(n, len(rows)), replace=False)]


def washed_out(uris: list[str], gamma: float) -> list[bytes]:
    out = []
    for u in uris:
        image = np.asarray(Image.open(u).convert("L"), np.float32) / 255
        buffer = io.BytesIO()
        Image.fromarray((image ** gamma * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def judge(screen: Screen, reference, inputs, limits: Limits) -> dict:
    frame = screen.predict(inputs, heatmap_size=0)
    comparisons = compare(reference, measure_values(answers_table(frame)), limits)
    return {"films": len(frame), "drifted": [c.measure for c in comparisons if c.drifted],
            "measures": {c.measure: {"psi": c.psi, "p": c.p_value, "n": c.n} for c in comparisons}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/cxr-screen")
    p.add_argument("--manifests", default="out/manifests", help="cxr prepare-data output")
    p.add_argument("--night", type=int, default=200, help="films per night")
    p.add_argument("--seeds", type=int, default=5, help="in-distribution nights (false-alarm rate)")
    p.add_argument("--out", default="out/drift.json")
    args = p.parse_args(argv)

    classifier, segmenter, _ = read_screen(Path(args.bundle))
    if classifier.reference is None:
        print(f"{args.bundle} carries no reference (python -m experiments.fit_reference)", file=sys.stderr)
        return 1
    reference = classifier.reference
    defaults = ScoreConfig()
    limits = Limits(defaults.drift_psi, defaults.drift_alpha, defaults.drift_min_images)
    screen = Screen(classifier, segmenter)
    manifests = Path(args.manifests)
    trained = {h for d in classifier.card.training_data for h in d.images}
    val_mix = {"kermany": 63, "shenzhen": 28, "covid/literature": 19, "covid/eurorad": 12, "jsrt": 10,
               "montgomery": 9, "covid/sirm": 8, "covid/radiopaedia": 6, "covid/hannover": 5}
    scale = args.night / sum(val_mix.values())
    mix = {k: max(1, round(v * scale)) for k, v in val_mix.items()}

    nights: dict[str, dict] = {}

    def night(name: str, inputs) -> None:
        nights[name] = judge(screen, reference, inputs, limits)
        print(f"{name}: {nights[name]['films']} films, drifted: {', '.join(nights[name]['drifted']) or 'none'}",
              flush=True)

    for seed in range(args.seeds):
        night(f"unseen films like the validation mix, seed {seed}",
              unseen_like_validation(manifests, trained, mix, seed))
    like = unseen_like_validation(manifests, trained, mix, 0)
    night("the same films, washed out (gamma 0.5)", washed_out(like, 0.5))
    night("the same films, gamma 0.8 (a mild processing change)", washed_out(like, 0.8))
    night("TBX11K (a hospital never seen)", sample(manifests / "tbx11k.parquet", args.night, 0))
    night("Kermany only (children)", sample(manifests / "kermany.parquet", args.night, 0,
                                            lambda r: ~r["sha256"].isin(trained)))
    night("lateral films and CT slices", sample(manifests / "views.parquet", args.night, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "bundle": args.bundle, "reference": reference.source,
                               "limits": limits.__dict__, "nights": nights}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
