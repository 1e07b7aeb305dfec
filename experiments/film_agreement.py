"""Does decoding at the models' resolution change what the screen says? For each film and each
archive format (``cxr.data.transcode``), the screen's probabilities and result from the film
decoded whole and from the film decoded only down to the models' size (``cxr.data.decode``).

    python -m experiments.film_agreement --films ../shared/data/fullres/jsrt --out docs/results/film_agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr.config import REPO_ROOT, default_data_root
from cxr.data.decode import decode_image
from cxr.data.transcode import FORMATS, encode
from cxr.screen import Screen


def grays(folder: Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """The folder's films as (H, W) uint8, by file name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    return {p.name: decode_image(p.read_bytes(), str(p)) for p in files}


def agreement(screen: Screen, films: dict[str, np.ndarray], formats=tuple(FORMATS)) -> list[dict]:
    """One row per (film, format): the largest probability difference between the two decodes,
    and whether the screen's result (flag, label, quality flags) is the same."""
    prep = screen.preprocess
    rows = []
    for fmt in formats:
        names, full, reduced = [], [], []
        for name, gray in films.items():
            data = encode(gray, fmt)
            names.append(name)
            full.append(prep.letterbox(decode_image(data, name)))
            reduced.append(prep.decoded(data, name))
        answers = [_screen(screen, names, boxed) for boxed in (full, reduced)]
        for i, name in enumerate(names):
            (p_full, r_full), (p_red, r_red) = answers[0][i], answers[1][i]
            rows.append({"film": name, "format": fmt, "max_probability_difference": float(np.abs(p_full - p_red).max()),
                         "same_result": r_full == r_red, "full": r_full, "reduced": r_red})
    return rows


def _screen(screen: Screen, names: list[str], boxed: list) -> list[tuple[np.ndarray, dict]]:
    images = np.stack([b[0] for b in boxed])
    seg = np.stack([b[1] for b in boxed]) if boxed[0][1] is not None else None
    out = screen.rows(names, [None] * len(names), [None] * len(names), images, seg, heatmap_size=None)
    keys = ("status", "predicted_label", "screen_positive", "quality_flags")
    return [(np.asarray(out["probabilities"][i], float), {k: out[k][i] for k in keys if k in out})
            for i in range(len(names))]


def summary(rows: list[dict]) -> dict:
    by_format = {}
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = [r for r in rows if r["format"] == fmt]
        by_format[fmt] = {"films": len(mine), "max_probability_difference": max(r["max_probability_difference"] for r in mine),
                          "same_result": sum(r["same_result"] for r in mine)}
    return by_format


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", default=str(Path(default_data_root()) / "fullres" / "jsrt"), help="a folder of full-size films")
    p.add_argument("--screen", default=str(REPO_ROOT / "models" / "cxr-screen"), help="a screen bundle folder")
    p.add_argument("--limit", type=int, help="at most this many films")
    p.add_argument("--out", help="JSON file for the rows and the summary")
    args = p.parse_args(argv)
    rows = agreement(Screen.from_folder(args.screen, "cpu"), grays(Path(args.films), args.limit))
    result = {"summary": summary(rows), "rows": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
