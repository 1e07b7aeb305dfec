"""``cxr score`` end to end on this machine over full-size DICOM films, against the same films
as the 320 px JPEGs of the curated data (issue 23): does a hospital's archive cost more per
film than the curated data?

Two folders are made from ``fullres/`` films: N films as 2048 px JPEG 2000 lossless DICOMs
(``--format``), and the same N films as 320 px JPEGs. Each is scored into a fresh output by the
promoted screen (``cxr-screen@champion``) with the job's defaults, on a Ray already started, so
both figures are the job's steady rate (the job's own images/s: listing to last write).
Needs the local stack (``make stack-up``, ``. .stack/env.sh``) and a champion (``cxr bootstrap``).

    python -m experiments.score_fullres --films ../shared/data/fullres/jsrt --images 400 --out docs/results/score_fullres.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
from datetime import date
from pathlib import Path

from PIL import Image

from experiments.film_agreement import grays
from cxr.config import default_data_root
from cxr.data.transcode import JPEG_QUALITY, encode, resized


def make_folders(films: dict, images: int, fmt: str, out: Path) -> tuple[Path, Path]:
    """``images`` files in each folder, cycling through the films (each file distinct by name)."""
    full, small = out / f"{fmt}-2048", out / "jpeg-320"
    for folder in (full, small):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    names = list(films)
    encoded = {n: encode(resized(films[n], 2048), fmt) for n in names}
    jpegs = {}
    for n in names:
        buf = io.BytesIO()
        Image.fromarray(resized(films[n], 320)).save(buf, "JPEG", quality=JPEG_QUALITY)
        jpegs[n] = buf.getvalue()
    for i in range(images):
        n = names[i % len(names)]
        (full / f"{i:06d}.dcm").write_bytes(encoded[n])
        (small / f"{i:06d}.jpg").write_bytes(jpegs[n])
    return full, small


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", default=str(Path(default_data_root()) / "fullres" / "jsrt"), help="a folder of full-size films")
    p.add_argument("--images", type=int, default=400, help="files per folder")
    p.add_argument("--format", default="dicom-jpeg2000-lossless", help="a cxr.data.transcode format")
    p.add_argument("--work", default="out/score_fullres", help="scratch folder for the inputs and outputs")
    p.add_argument("--out", help="JSON file for the figures")
    args = p.parse_args(argv)
    from cxr.config import ScoreConfig
    from jobs.runtime import init_ray
    from jobs.score import run

    work = Path(args.work)
    full, small = make_folders(grays(Path(args.films)), args.images, args.format, work)
    init_ray()
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "images": args.images, "format": args.format}
    for name, folder in (("jpeg_320", small), (f"{args.format}_2048", full)):
        output = work / f"scores-{name}"
        shutil.rmtree(output, ignore_errors=True)
        summary = run(ScoreConfig(input=str(folder), output=str(output)))
        result[name] = {"scored": summary["scored"], "by_status": summary["by_status"],
                        "seconds": summary["seconds"], "images_per_s": summary["images_per_s"]}
        print(f"{name}: {summary['scored']} scored in {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s")
    result["full_over_small"] = result[f"{args.format}_2048"]["images_per_s"] / result["jpeg_320"]["images_per_s"]
    print(f"2048 px {args.format} runs at {result['full_over_small']:.0%} of the 320 px JPEG rate")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
