"""Bundle sizes and what each weights dtype costs in predictions.

1. The paper's full-size screen (ResNet50, 4 classes, 224 px + UNet-resnet34, 256 px) written
   as a bundle in float32, bfloat16 and int8: total MiB, the largest file, the file count. The
   weights are untrained (a bundle's size does not depend on their values), so this needs no
   registry.
2. With ``--model models:/...`` (a registered screen or classifier, e.g. the demo's champion):
   that model exported in each dtype through ``cxr export-model``'s workflow, and its
   predictions on ``--images`` compared with float32's (largest probability difference,
   predicted labels and screen flags that change), and each bundle moved into a second,
   empty MLflow server (started on loopback) by ``cxr import-model``'s workflow: the largest
   difference between the predictions through the imported screen and through the original.

    python -m experiments.bundle_size [--model models:/cxr-screen@champion --images data/sample]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cxr.card import ModelCard, Preprocessing
from cxr.models import build_model
from cxr.package import Component, folder_bytes
from cxr.weights import DTYPES
from cxr.workflows.benchmark import machine
from cxr.workflows.screen import build_screen


def full_size_screen() -> tuple[Component, Component]:
    classifier = Component(build_model("resnet50", num_classes=4), ModelCard(
        task="classifier", architecture="resnet50", labels=("covid", "normal", "bacterial", "viral"),
        input_shape=(3, 224, 224), output="logits", model_kwargs={"num_classes": 4},
        preprocessing=Preprocessing.for_classifier(224, True, "cxr-segmenter", "1")).validate(), "cxr-classifier", "1")
    segmenter = Component(build_model("unet-resnet34"), ModelCard(
        task="segmenter", architecture="unet-resnet34", labels=("lung",), input_shape=(1, 256, 256),
        output="lung logits", preprocessing=Preprocessing.for_segmenter(256)).validate(), "cxr-segmenter", "1")
    return classifier, segmenter


def sizes(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    return {"mib": folder_bytes(folder) / 2**20, "files": len(files),
            "largest": f"{largest.relative_to(folder)} {largest.stat().st_size / 2**20:.1f} MiB"}


def int8_halves(model_uri: str, images: list[str], base) -> dict:
    """Where int8's cost comes from: the classifier alone in int8, then the segmenter alone."""
    from cxr.config import load_platform
    from cxr.screen import Screen
    from cxr.weights import state_for_storage, state_from_storage
    from cxr.workflows.screen import components

    def int8(c: Component) -> Component:
        model = build_model(c.card.architecture, **c.card.model_kwargs)
        model.load_state_dict(state_from_storage(state_for_storage(c.model.state_dict(), "int8")))
        return Component(model.eval(), c.card, c.name, c.version)

    classifier, segmenter = components(load_platform().tracking_uri, model_uri)
    ok = base["status"] != "error"
    out = {}
    for name, pair in (("classifier", (int8(classifier), segmenter)), ("segmenter", (classifier, int8(segmenter)))):
        rows = Screen(*pair, device="cpu").predict(images)
        out[f"{name} in int8"] = {
            "max_abs_probability_difference": float(np.abs(np.stack(rows["probabilities"][ok])
                                                           - np.stack(base["probabilities"][ok])).max()),
            "max_abs_lung_fraction_difference": float(np.abs(rows["lung_fraction"][ok].astype(float)
                                                             - base["lung_fraction"][ok].astype(float)).max()),
            "changed_labels": int((rows["predicted_label"][ok] != base["predicted_label"][ok]).sum())}
    return out


def round_trip(bundle: Path, other, images: list[str], expected) -> float:
    """Import ``bundle`` into the ``other`` registry and predict through it: the largest
    probability difference from ``expected`` (0.0: identical)."""
    import dataclasses

    import cxr
    from cxr.config import load_platform
    from cxr.workflows.screen import import_model

    platform = dataclasses.replace(load_platform(), tracking_uri=other.tracking_uri)
    versions = import_model(platform, bundle)
    uri = f"models:/{platform.registered_models['screen']}/{versions['screen']}"
    again = cxr.load(uri, tracking_uri=other.tracking_uri, device="cpu").predict(images)
    ok = expected["status"] != "error"
    return float(np.abs(np.stack(again["probabilities"][ok]) - np.stack(expected["probabilities"][ok])).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a registered screen or classifier to export in each dtype and compare")
    p.add_argument("--images", default="data/sample", help="folder of images the dtypes are compared on")
    p.add_argument("--out", default="out/bundle-size.json")
    args = p.parse_args(argv)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "full_size": {}}
    classifier, segmenter = full_size_screen()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            folder = build_screen(Path(tmp) / dtype, classifier, segmenter, dtype)
            result["full_size"][dtype] = sizes(folder)
            print(f"resnet50 @224 + unet-resnet34 @256, {dtype}: {result['full_size'][dtype]}")
        if args.model:
            import cxr
            from cxr.config import load_platform
            from cxr.workflows.screen import export_model

            images = sorted(str(q) for q in Path(args.images).rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
            from infra.local.stack import LocalStack

            rows = {}
            other = LocalStack(Path(tmp) / "second-registry").start()
            try:
                for dtype in DTYPES:
                    (bundle,) = export_model(load_platform(), args.model, Path(tmp) / f"export-{dtype}", dtype)
                    rows[dtype] = cxr.load(bundle, device="cpu").predict(images)
                    entry = result.setdefault("model", {"uri": args.model, "images": len(images)})[dtype] = sizes(bundle)
                    entry["round_trip_max_abs_difference"] = round_trip(bundle, other, images, rows[dtype])
            finally:
                other.stop()
            base = rows["float32"]
            ok = base["status"] != "error"
            for dtype in ("bfloat16", "int8"):
                other = rows[dtype]
                diff = np.abs(np.stack(other["probabilities"][ok]) - np.stack(base["probabilities"][ok]))
                result["model"][dtype].update(
                    max_abs_probability_difference=float(diff.max()),
                    changed_labels=int((other["predicted_label"][ok] != base["predicted_label"][ok]).sum()),
                    changed_screen_flags=int((other["screen_positive"][ok] != base["screen_positive"][ok]).sum()))
                print(f"{args.model} as {dtype}: {result['model'][dtype]}")
            result["model"]["int8_one_half_at_a_time"] = int8_halves(args.model, images, base)
            print(f"int8, one half at a time: {result['model']['int8_one_half_at_a_time']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
