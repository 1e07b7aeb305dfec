"""The files of a model and of a screen: what the registry stores and what a bundle is.

A model folder: ``model.safetensors`` + ``card.json`` (+ MLflow's ``MLmodel`` and env files).
A screen folder (a registered ``cxr-screen`` version, and an exported bundle, are the same):

    screen.json               format, version, weights dtype, the component models' origin
    classifier/               model.safetensors, card.json
    segmenter/                model.safetensors, card.json (absent for a screen without one)
    MODEL_CARD.md             the card for people
    MLmodel, *.yaml, *.txt    MLflow's python_function flavor (loader_module cxr.pyfunc)
    checksums.sha256          sha256 of every other file (sha256sum's format)
    signature.json            optional: HMAC-SHA256 of checksums.sha256 with a site's key

Checksums catch corruption; only a signature catches an edit (anyone can recompute checksums).
``cxr export-model --sign-key FILE`` signs, ``cxr import-model --require-signature --verify-key
FILE`` refuses an unsigned bundle or one whose files changed after signing.

Every reader refuses a folder holding any file outside ``SAFE_NAMES``: nothing in it is ever
unpickled or executed; the code is the installed ``cxr`` package.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.card import ModelCard
from cxr.component import Component

if TYPE_CHECKING:        # torch and the model code load where weights are read or written
    import torch
    from torch import nn

    from cxr.monitoring import Reference
    from cxr.qc import QualityModel

WEIGHTS, CARD, LEGACY_META = "model.safetensors", "card.json", "meta.json"
SCREEN, CHECKSUMS, MARKDOWN, SIGNATURE = "screen.json", "checksums.sha256", "MODEL_CARD.md", "signature.json"
SCREEN_FORMAT, SCREEN_FORMAT_VERSION = "cxr-screen", 1
# Data and text only: weights, JSON, YAML, text and MLflow's metadata files.
SAFE_NAMES = {WEIGHTS, CARD, LEGACY_META, SCREEN, CHECKSUMS, MARKDOWN, SIGNATURE, "qc.safetensors", "qc.json",
              "reference.json",
              "MLmodel", "registered_model_meta",
              "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
              "serving_input_example.json"}
COMPONENTS = ("classifier", "segmenter")
# The files the checksums do not list: themselves, the signature of them, and the file MLflow
# adds to a registered model's folder; only at the top: one of these names anywhere else is listed.
UNLISTED = {CHECKSUMS, SIGNATURE, "registered_model_meta"}


class PackageError(ValueError):
    """A model folder or bundle that cannot be trusted: unexpected files, bad checksums, bad card."""


def check_safe(folder: Path, what: str) -> None:
    """Refuse a folder holding a link or any file outside ``SAFE_NAMES``, before reading anything."""
    folder = Path(folder)
    links, unexpected = [], []
    for root, dirs, files in os.walk(folder):       # links are listed, never followed
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                links.append(rel)
            elif name in files and name not in SAFE_NAMES:
                unexpected.append(rel)
    if links:
        raise PackageError(f"{what} holds links {sorted(links)}: refusing to load")
    if unexpected:
        raise PackageError(f"{what} holds unexpected files {sorted(unexpected)}: refusing to load; "
                           "cxr models are safetensors + JSON only")


def write_model(folder: Path, model: nn.Module, card: ModelCard, dtype: str = "float32",
                qc: QualityModel | None = None, reference: Reference | None = None) -> Path:
    from cxr.weights import save_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS, dtype)
    (folder / CARD).write_text(card.validate().to_json())
    if qc is not None:
        qc.save(folder)
    if reference is not None:
        write_reference(folder, reference)
    return folder


def write_reference(folder: Path, reference: Reference) -> None:
    from cxr.monitoring import REFERENCE_FILE

    (Path(folder) / REFERENCE_FILE).write_text(reference.to_json())


def read_reference(folder: Path) -> Reference | None:
    """The reference distributions stored beside a classifier's weights, or None (a model
    registered before monitoring, or without validation films)."""
    from cxr.monitoring import REFERENCE_FILE, Reference

    path = Path(folder) / REFERENCE_FILE
    if not path.exists():
        return None
    try:
        return Reference.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise PackageError(f"{path} is not a cxr reference ({type(e).__name__}: {e})") from e


def read_qc(folder: Path) -> QualityModel | None:
    from cxr.qc import QualityModel

    return QualityModel.load(folder)


def read_card(folder: Path) -> ModelCard:
    return ModelCard.from_json((Path(folder) / CARD).read_text())


def read_model(folder: Path, device: str | torch.device = "cpu", what: str | None = None) -> tuple[nn.Module, ModelCard]:
    """(module in eval mode on ``device``, validated card) of a model folder."""
    folder = Path(folder)
    check_safe(folder, what or str(folder))
    card = read_card(folder)
    from cxr.models import build_model
    from cxr.weights import load_weights

    model = build_model(card.architecture, **card.model_kwargs)
    try:
        load_weights(model, folder / WEIGHTS)
    except (RuntimeError, OSError, ValueError) as e:   # safetensors and load_state_dict's errors
        raise PackageError(f"{what or folder}: its weights do not fit a {card.architecture} "
                           f"({str(e).splitlines()[0][:200]})") from e
    return model.to(device).eval(), card


def write_screen(folder: Path, classifier: Component, segmenter: Component | None, dtype: str = "float32",
                 source: str | None = None) -> Path:
    """The screen's data files (MLflow's files and the checksums are added by the caller)."""
    from cxr.model_card import screen_markdown

    folder = Path(folder)
    write_model(folder / "classifier", classifier.model, classifier.card, dtype, classifier.qc, classifier.reference)
    if segmenter is not None:
        write_model(folder / "segmenter", segmenter.model, segmenter.card, dtype)
    (folder / SCREEN).write_text(json.dumps({
        "format": SCREEN_FORMAT, "format_version": SCREEN_FORMAT_VERSION, "weights_dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
        **{kind: ({"name": c.name, "version": c.version} if c else None)
           for kind, c in (("classifier", classifier), ("segmenter", segmenter))}}, indent=2))
    (folder / MARKDOWN).write_text(screen_markdown(classifier, segmenter))
    return folder


def read_screen_info(folder: Path) -> dict:
    path = Path(folder) / SCREEN
    if not path.exists():
        raise PackageError(f"{folder} is not a cxr screen (no {SCREEN})")
    try:
        info = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise PackageError(f"{path} is not readable JSON ({type(e).__name__})") from e
    if not isinstance(info, dict) or not isinstance(info.get("format_version"), int) or \
            not all(isinstance(info.get(k), (dict, type(None))) for k in COMPONENTS):
        raise PackageError(f"{path} is not a cxr screen description")
    if info.get("format") != SCREEN_FORMAT or info["format_version"] > SCREEN_FORMAT_VERSION:
        raise PackageError(f"{folder}: {SCREEN} is format {info.get('format')!r} version {info.get('format_version')}; "
                           f"this cxr reads {SCREEN_FORMAT!r} up to version {SCREEN_FORMAT_VERSION}")
    return info


def read_screen(folder: Path, device: str | torch.device = "cpu") -> tuple[Component, Component | None, dict]:
    folder = Path(folder)
    check_safe(folder, str(folder))
    info = read_screen_info(folder)
    verify_checksums(folder)
    parts = {}
    for kind in COMPONENTS:
        if (folder / kind / CARD).exists():
            model, card = read_model(folder / kind, device)
            if card.task != kind:
                raise PackageError(f"{folder}/{kind}/card.json is a {card.task} card")
            origin = info.get(kind) or {}
            parts[kind] = Component(model, card, origin.get("name"), origin.get("version"), read_qc(folder / kind),
                                    read_reference(folder / kind))
    if "classifier" not in parts:
        raise PackageError(f"{folder} has no classifier/")
    return parts["classifier"], parts.get("segmenter"), info


# --- checksums ---------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> Path:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in UNLISTED)
    lines = [f"{_digest(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")
    return folder / CHECKSUMS


def verify_checksums(folder: Path) -> int:
    """Check every listed file and that no file is unlisted; returns the number checked."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise PackageError(f"{folder} has no {CHECKSUMS}: not a complete cxr screen or bundle")
    listed = {}
    for number, line in enumerate((folder / CHECKSUMS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise PackageError(f"{folder}/{CHECKSUMS} line {number} is not 'SHA256  NAME'")
        listed[parts[1].strip().removeprefix("*")] = parts[0].lower()     # "*": sha256sum -b
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - UNLISTED
    if present - set(listed):
        raise PackageError(f"{folder}: files not in {CHECKSUMS}: {sorted(present - set(listed))}")
    if set(listed) - present:
        raise PackageError(f"{folder}: files missing: {sorted(set(listed) - present)}")
    for name, digest in listed.items():
        if _digest(folder / name) != digest:
            raise PackageError(f"{folder}: {name} does not match its checksum (corrupted or changed)")
    return len(listed)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- signatures ----------------------------------------------------------------------------------
# HMAC-SHA256 (the standard library's hmac): a site signs and verifies with one secret key of its
# own; the signed message is checksums.sha256, which names every file with its sha256.

def read_key(path: str | Path) -> bytes:
    """A signing key: the bytes of a file (at least 32 of them, e.g. ``openssl rand -out KEY 32``)."""
    key = Path(path).read_bytes()          # as it is: a random key's first or last byte may be whitespace
    if len(key) < 32:
        raise PackageError(f"{path}: a signing key needs at least 32 bytes, got {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """Which key signed, without revealing it: the first 12 hex digits of its sha256."""
    return hashlib.sha256(key).hexdigest()[:12]


def sign_bundle(folder: Path, key: bytes) -> Path:
    """Sign a sealed bundle folder (its checksums written): writes ``signature.json``."""
    folder = Path(folder)
    message = (folder / CHECKSUMS).read_bytes()
    (folder / SIGNATURE).write_text(json.dumps({
        "algorithm": "hmac-sha256", "key_id": key_id(key), "signed": CHECKSUMS,
        "signature": hmac.new(key, message, hashlib.sha256).hexdigest(),
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
    return folder / SIGNATURE


def verify_signature(folder: Path, key: bytes) -> dict:
    """Refuse a bundle that is unsigned, signed with another key, or changed after signing
    (its files are then checked against the signed checksums by ``verify_checksums``)."""
    folder = Path(folder)
    if not (folder / SIGNATURE).is_file():
        raise PackageError(f"{folder.name} is not signed (no {SIGNATURE}), and a signature is required")
    try:
        signed = json.loads((folder / SIGNATURE).read_text())
        algorithm, claimed = signed["algorithm"], str(signed["signature"])
    except (ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{folder.name}/{SIGNATURE} is not a readable signature") from e
    if algorithm != "hmac-sha256":
        raise PackageError(f"{folder.name}: signature algorithm {algorithm!r}; this cxr verifies hmac-sha256")
    if signed.get("key_id") != key_id(key):
        raise PackageError(f"{folder.name} was signed with key {signed.get('key_id')}, not this key ({key_id(key)})")
    expected = hmac.new(key, (folder / CHECKSUMS).read_bytes(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, claimed):
        raise PackageError(f"{folder.name}: its signature does not match its contents (edited after signing)")
    verify_checksums(folder)
    return signed
