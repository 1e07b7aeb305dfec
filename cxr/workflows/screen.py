"""Screen workflows: register a classifier and its segmenter as one MLflow model
(``cxr-screen``), export a registered model as a portable bundle, import a bundle into any
registry, and load a screen from either (``cxr.load``)."""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr import tracking
from cxr.config import PlatformConfig
from cxr.package import (SCREEN, Component, PackageError, read_screen, sign_bundle, verify_signature,
                         write_screen)
from cxr.screen import Screen

log = logging.getLogger(__name__)


def screen_name(platform: PlatformConfig) -> str:
    return platform.registered_models.get("screen", "cxr-screen")


def example_image() -> bytes:
    """The input example of a screen's signature: a small synthetic grayscale PNG (no patient data)."""
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def components(tracking_uri: str, model_uri: str, segmenter_uri: str | None = None) -> tuple[Component, Component | None]:
    """The classifier and segmenter of a registered screen, or of a registered classifier:
    with the segmenter its card pins, else ``segmenter_uri`` (the quality signal only) or none."""
    version = tracking.resolve_version(tracking_uri, model_uri)
    if version.tags.get("cxr.task") == "screen":
        with tempfile.TemporaryDirectory() as tmp:
            local, _ = tracking.download_model(tracking_uri, model_uri, tmp)
            classifier, segmenter, _ = read_screen(local)
        return classifier, segmenter
    classifier = tracking.load_registered(tracking_uri, model_uri)
    if classifier.card.task != "classifier":
        raise PackageError(f"{model_uri} is a {classifier.card.task}; a screen starts from a classifier or a screen")
    prep = classifier.card.preprocessing
    if prep.lung_mask:
        return classifier, tracking.load_registered(tracking_uri, prep.segmenter_uri)
    if segmenter_uri and not tracking.model_exists(tracking_uri, segmenter_uri):
        log.warning("%s does not resolve: the screen of %s has no lung-area quality signal", segmenter_uri, model_uri)
        segmenter_uri = None
    return classifier, tracking.load_registered(tracking_uri, segmenter_uri) if segmenter_uri else None


def build_screen(folder: Path, classifier: Component, segmenter: Component | None, dtype: str = "float32",
                 source: str | None = None) -> Path:
    """A complete screen folder: data files, MLflow's python_function files (signature, input
    example), checksums. It is a bundle and a registrable MLflow model at once."""
    write_screen(folder, classifier, segmenter, dtype, source)
    tracking.save_screen_model(folder, example_image())
    return folder


def register_screen(platform: PlatformConfig, classifier_uri: str, segmenter_uri: str | None = None,
                    alias: str | None = None) -> str:
    """Register the screen of a registered classifier (or re-register a screen) as a new
    version of ``cxr-screen``; with ``alias``, point it there. Returns the version."""
    uri = platform.tracking_uri
    classifier, segmenter = components(uri, classifier_uri, segmenter_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_screen(Path(tmp) / "screen", classifier, segmenter, source=classifier_uri)
        with tracking.tracked_run(uri, platform.experiments.get("screen", "cxr-screen"), "register-screen",
                                  tags={"cxr.job": "register-screen", "cxr.source": classifier_uri},
                                  artifact_location=platform.artifact_location) as run_id:
            version = tracking.register_screen_folder(uri, screen_name(platform), run_id, folder)
    if alias:
        tracking.set_alias(uri, screen_name(platform), alias, version)
    return version


def screen_of_classifier(platform: PlatformConfig, classifier_version: str) -> str:
    """The ``cxr-screen`` version of ``cxr-classifier`` version ``classifier_version`` (the
    newest float32 one), registered first if there is none: what promoting a classifier promotes."""
    uri, name = platform.tracking_uri, platform.registered_models["classifier"]
    wanted = f"{name}/{classifier_version}"
    found = [v for v in tracking.client(uri).search_model_versions(f"name='{screen_name(platform)}'")
             if v.tags.get("cxr.classifier") == wanted and v.tags.get("cxr.weights_dtype") == "float32"]
    if found:
        return str(max(int(v.version) for v in found))
    return register_screen(platform, f"models:/{wanted}",
                           f"models:/{platform.registered_models['segmenter']}@{platform.aliases['champion']}")


# --- bundles ----------------------------------------------------------------------------------------

def export_model(platform: PlatformConfig, model_uri: str, out: str | Path, dtype: str = "float32",
                 segmenter_uri: str | None = None, part_mb: float | None = None,
                 sign_key: bytes | None = None) -> list[Path]:
    """A self-contained bundle of a registered screen or classifier: a folder (or, for a name
    ending in .tar, one tar file) that ``import_model`` and ``cxr.load`` read. Weights as
    ``dtype`` (float32, bfloat16 or int8, see ``cxr.weights``). With ``part_mb``, a tar larger
    than that is cut into ``NAME.tar.000``, ``.001``, ... (a transfer limited per file, like
    the GPU machine's 16 MiB). With ``sign_key``, the bundle is signed (``cxr.package.sign_bundle``).
    Returns the files or the folder written."""
    out = Path(out)
    classifier, segmenter = components(platform.tracking_uri, model_uri, segmenter_uri)
    version = tracking.resolve_version(platform.tracking_uri, model_uri)
    source = f"{platform.tracking_uri} {model_uri} (= {version.name}/{version.version})"
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_screen(Path(tmp) / "bundle", classifier, segmenter, dtype, source)
        if sign_key is not None:
            sign_bundle(folder, sign_key)
        if out.suffix == ".tar":
            out.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(out, "w") as tar:     # uncompressed: weights barely compress
                tar.add(folder, arcname=out.stem)
            if part_mb and out.stat().st_size > part_mb * 2**20:
                return split_file(out, int(part_mb * 2**20))
            return [out]
        if part_mb:
            raise ValueError("parts are cut from a .tar bundle: give an --out ending in .tar")
        if out.exists():
            raise FileExistsError(f"{out} exists; export into a new folder")
        shutil.copytree(folder, out)
    return [out]


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """``path`` cut into ``path.000``, ``path.001``, ... of at most ``part_bytes``; ``path`` removed."""
    parts = []
    with open(path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = path.with_name(f"{path.name}.{i:03d}")
            part.write_bytes(chunk)
            parts.append(part)
    path.unlink()
    return parts


def _joined(bundle: Path, dst: Path) -> Path:
    """A bundle given as its first part (``NAME.tar.000``), or as ``NAME.tar`` whose parts lie
    beside it, joined into one tar under ``dst``; any other path as it is."""
    first = bundle if bundle.suffix == ".000" else bundle.with_name(bundle.name + ".000")
    if bundle.exists() and bundle.suffix != ".000" or not first.exists():
        return bundle
    stem = first.name[:-len(".000")]
    parts = sorted(first.parent.glob(f"{stem}.[0-9][0-9][0-9]"))
    if [p.suffix for p in parts] != [f".{i:03d}" for i in range(len(parts))]:
        raise PackageError(f"{bundle}: the parts of {stem} are not numbered 000 to {len(parts) - 1:03d} without gaps")
    joined = dst / stem
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    return joined


def unpack_bundle(bundle: str | Path, dst: Path) -> Path:
    """A bundle folder from a folder, a .tar, or a .tar cut in parts (members checked: plain
    files and folders under one folder; the checksums inside catch a bad join)."""
    bundle = Path(bundle)
    if bundle.is_dir():
        return bundle
    bundle = _joined(bundle, dst)
    if not bundle.is_file() or not tarfile.is_tarfile(bundle):
        raise PackageError(f"{bundle} is neither a bundle folder nor a .tar")
    try:
        with tarfile.open(bundle) as tar:
            odd = [m.name for m in tar.getmembers() if not (m.isfile() or m.isdir())]
            if odd:
                raise PackageError(f"{bundle} holds links or special files {odd[:5]}: refusing it")
            # The "data" filter also refuses absolute paths and paths leaving the folder.
            tar.extractall(dst, filter="data")
    except tarfile.TarError as e:
        raise PackageError(f"{bundle}: {e}") from e
    folders = [p for p in dst.iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise PackageError(f"{bundle} must hold one bundle folder, found {[p.name for p in folders]}")
    return folders[0]


def import_model(platform: PlatformConfig, bundle: str | Path, alias: str | None = None,
                 verify_key: bytes | None = None, require_signature: bool = False) -> dict[str, str]:
    """Verify a bundle (checksums, cards; its signature with ``verify_key``, which
    ``require_signature`` demands) and register it in this registry: its segmenter as a
    new ``cxr-segmenter`` version, its classifier as a new ``cxr-classifier`` version (its card
    now pinning that segmenter version) and the screen as a new ``cxr-screen`` version. With
    ``alias``, all three point there. Returns {kind: version}."""
    uri, names = platform.tracking_uri, platform.registered_models
    with tempfile.TemporaryDirectory() as tmp:
        folder = unpack_bundle(bundle, Path(tmp))
        if require_signature and verify_key is None:
            raise PackageError("a signature is required but no --verify-key was given")
        if verify_key is not None:
            verify_signature(folder, verify_key)
        classifier, segmenter, info = read_screen(folder)      # links, files, checksums, cards, weights
        provenance = {"bundle": Path(bundle).name, "source": info.get("source"), "weights_dtype": info["weights_dtype"]}
        versions: dict[str, str] = {}
        experiment = platform.experiments.get("screen", "cxr-screen")
        with tracking.tracked_run(uri, experiment, "import-model", tags={"cxr.job": "import-model"},
                                  artifact_location=platform.artifact_location) as parent:
            if segmenter is not None:
                card = dataclasses.replace(segmenter.card, provenance={
                    **segmenter.card.provenance, "import": {**provenance, **_origin(info, "segmenter")}})
                with tracking.tracked_run(uri, experiment, "import-segmenter", parent_run_id=parent,
                                          artifact_location=platform.artifact_location) as run_id:
                    versions["segmenter"] = tracking.register_model(uri, names["segmenter"], run_id, segmenter.model, card)
                segmenter = Component(segmenter.model, card, names["segmenter"], versions["segmenter"])
            card = classifier.card
            if card.preprocessing.lung_mask:
                # The classifier was trained on this segmenter's masks: pin its version here.
                card = dataclasses.replace(card, preprocessing=dataclasses.replace(
                    card.preprocessing, segmenter_name=names["segmenter"], segmenter_version=versions["segmenter"]))
            # What training recorded stays; the import is added beside it.
            card = dataclasses.replace(card, provenance={**card.provenance,
                                                         "import": {**provenance, **_origin(info, "classifier")}})
            with tracking.tracked_run(uri, experiment, "import-classifier", parent_run_id=parent,
                                      artifact_location=platform.artifact_location) as run_id:
                versions["classifier"] = tracking.register_model(uri, names["classifier"], run_id, classifier.model, card,
                                                                 qc=classifier.qc, reference=classifier.reference)
            classifier = Component(classifier.model, card, names["classifier"], versions["classifier"], classifier.qc,
                                   classifier.reference)
            screen_folder = build_screen(Path(tmp) / "screen", classifier, segmenter, info["weights_dtype"],
                                         f"bundle {Path(bundle).name}")
            versions["screen"] = tracking.register_screen_folder(uri, screen_name(platform), parent, screen_folder)
    if alias:
        for kind, version in versions.items():
            tracking.set_alias(uri, names.get(kind, screen_name(platform)), alias, version)
    return versions


def _origin(info: dict, kind: str) -> dict:
    origin = info.get(kind) or {}
    return {"source_name": origin.get("name"), "source_version": origin.get("version")}


# --- the Python API ---------------------------------------------------------------------------------

def load(model: str | Path, tracking_uri: str | None = None, device: str | torch.device | None = None,
         segmenter: str | None = None, storage=None) -> Screen:
    """A ``Screen`` from a bundle (folder or .tar), a screen folder, or the registry
    (``models:/cxr-screen@champion``, or a classifier's ``models:/...`` with the segmenter it
    pins, else ``segmenter`` for the quality signal). ``tracking_uri`` and ``storage`` (for
    s3:// inputs) default to the platform's (``MLFLOW_TRACKING_URI``, ``CXR_S3_ENDPOINT``, mlflow.yaml)."""
    if storage is None:
        from cxr.config import load_platform

        storage = load_platform().storage
    if not str(model).startswith("models:/"):
        path = Path(model)
        if path.is_dir() and (path / SCREEN).exists():
            return Screen.from_folder(path, device, storage=storage)
        with tempfile.TemporaryDirectory() as tmp:
            return Screen.from_folder(unpack_bundle(path, Path(tmp)), device, storage=storage)
    if tracking_uri is None:
        from cxr.config import load_platform

        tracking_uri = load_platform().tracking_uri
    classifier, seg = components(tracking_uri, str(model), segmenter)
    return Screen(classifier, seg, device, storage=storage)
