"""Decode rates per core (issue 23): each archive format at 2048 and 3000 px, decoded whole and
decoded down to the shipped screen's size, then letterboxed as the screen does; beside them the
320 px JPEG rate of the curated data, measured in the same run.

One process, one thread (OpenCV is held to one thread; Pillow and pydicom use one): the figure
is images/s per core. Films are made at run time from ``fullres/`` (``cxr.data.transcode``).

    python -m experiments.decode_rates --films ../shared/data/fullres/jsrt --out docs/results/decode_rates.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.film_agreement import grays
from cxr.config import REPO_ROOT, default_data_root
from cxr.data.decode import decode_film
from cxr.data.letterbox import decode_side, letterbox_pair
from cxr.data.transcode import FORMATS, JPEG_QUALITY, encode, resized
from cxr.screen import Screen

# What an archive's formats must reach per core at 2048 px, reduced (issue 23's floor).
FLOORS = {"jpeg": 300, "dicom-uncompressed-16bit": 150, "dicom-jpeg2000-lossless": 25, "dicom-rle": 30, "png": 30}


def rate(blobs: list[bytes], sizes: tuple[int, int | None], min_side: int | None, seconds: float) -> float:
    """Images/s of decode + letterbox over ``blobs``, cycling for at least ``seconds``."""
    done, started = 0, time.perf_counter()
    while True:
        for i, data in enumerate(blobs):
            film = decode_film(data, f"film-{i}", min_side=min_side)
            letterbox_pair(film.gray, sizes, 128, (film.height, film.width))
        done += len(blobs)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def small_jpeg(gray: np.ndarray, side: int = 320) -> bytes:
    out = io.BytesIO()
    Image.fromarray(resized(gray, side)).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def measure(films: list[np.ndarray], sizes: tuple[int, int | None], sides=(2048, 3000), seconds: float = 3.0,
            formats=tuple(FORMATS)) -> dict:
    min_side = decode_side(sizes)
    rows = [{"format": "jpeg", "side": 320, "reduced": rate([small_jpeg(g) for g in films], sizes, min_side, seconds),
             "whole": rate([small_jpeg(g) for g in films], sizes, None, seconds)}]
    for side in sides:
        for fmt in formats:
            blobs = [encode(resized(g, side), fmt) for g in films]
            rows.append({"format": fmt, "side": side, "bytes_per_film": int(np.mean([len(b) for b in blobs])),
                         "reduced": rate(blobs, sizes, min_side, seconds),
                         "whole": rate(blobs, sizes, None, seconds / 3)})
    for row in rows:
        floor = FLOORS.get(row["format"]) if row["side"] == 2048 else None
        row["floor"], row["meets_floor"] = floor, (row["reduced"] >= floor) if floor else None
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "sizes": list(sizes), "decoded_down_to": min_side, "films": len(films), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", default=str(Path(default_data_root()) / "fullres" / "jsrt"), help="a folder of full-size films")
    p.add_argument("--screen", default=str(REPO_ROOT / "models" / "cxr-screen"), help="the screen whose sizes decide the reduction")
    p.add_argument("--limit", type=int, default=8, help="films to cycle through")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per reduced rate")
    p.add_argument("--out")
    args = p.parse_args(argv)
    sizes = Screen.from_folder(args.screen, "cpu").preprocess.sizes
    result = measure(list(grays(Path(args.films), args.limit).values()), sizes, seconds=args.seconds)
    for r in result["rows"]:
        print(f"{r['format']:28s} {r['side']:5d} px  reduced {r['reduced']:7.1f}/s  whole {r['whole']:6.1f}/s"
              + (f"  floor {r['floor']} {'ok' if r['meets_floor'] else 'SHORT'}" if r["floor"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
