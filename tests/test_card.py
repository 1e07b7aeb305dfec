"""The model card, weights and packaging, without servers: validation that names the field,
cards of older versions, JSON without NaN, the Markdown card, weights in three dtypes,
checksums and the refusal of anything that is not weights or text."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from cxr.card import CardError, ModelCard, OperatingPoint, Preprocessing
from cxr.model_card import model_markdown
from cxr.models import build_model
from cxr.package import (Component, PackageError, read_model, read_screen, verify_checksums, write_checksums,
                         write_model, write_screen)
from cxr.model_input import Preprocess
from cxr.screen import Screen
from cxr.weights import load_weights, save_weights, stored_dtype


def classifier_card(**changes) -> ModelCard:
    card = ModelCard(task="classifier", architecture="resnet18-tiny", labels=("covid", "normal", "bacterial", "viral"),
                     input_shape=(3, 64, 64), output="logits", model_kwargs={"num_classes": 4},
                     preprocessing=Preprocessing.for_classifier(64, True, "seg", "7", 3),
                     operating_point=OperatingPoint(0.3, 0.85, "validation, adult images (n=40)"),
                     metrics={"test": {"n": 10, "metrics": {"accuracy": {"value": 0.9, "low": 0.8, "high": 1.0},
                                                            "f1_covid": {"value": float("nan"), "low": float("nan"),
                                                                         "high": float("nan")}},
                                       "adult": {"n": 4, "covid_sensitivity": {"value": 1.0, "low": 1.0, "high": 1.0},
                                                 "covid_specificity": {"value": 0.5, "low": 0.0, "high": 1.0}},
                                       "covid_auroc_within": {"source=covid": {"value": 0.6, "low": 0.4, "high": 0.8,
                                                                               "n_positive": 6, "n_negative": 5}}}})
    return dataclasses.replace(card, **changes)


def segmenter_card() -> ModelCard:
    return ModelCard(task="segmenter", architecture="unet-tiny", labels=("lung",), input_shape=(1, 64, 64),
                     output="lung logits", preprocessing=Preprocessing.for_segmenter(64))


def test_a_card_round_trips_through_json_without_nan():
    card = classifier_card().validate()
    text = card.to_json()
    assert "NaN" not in text and json.loads(text)["metrics"]["test"]["metrics"]["f1_covid"]["value"] is None
    again = ModelCard.from_json(text)
    assert again.preprocessing == card.preprocessing and again.operating_point == card.operating_point
    assert again.preprocessing.segmenter_uri == "models:/seg/7"


PREP = {"letterbox_size": 64, "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("change,field", [
    ({"labels": ["covid", "covid"]}, "labels"),
    ({"architecture": "resnet9000"}, "architecture"),
    ({"input_shape": [3, 32, 32]}, "input_shape"),
    ({"operating_point": {"threshold": 0.3, "min_specificity": 0.85, "chosen_on": "v", "label": "flu"}},
     "operating_point.label"),
    ({"preprocessing": {"letterbox_size": 64, "channels": 3, "mean": [0.5, 0.5], "std": [1, 1, 1]}},
     "preprocessing.mean"),
    ({"preprocessing": {**PREP, "lung_mask": True}}, "preprocessing.segmenter_version"),
    ({"preprocessing": {**PREP, "lung_mask": "false"}}, "preprocessing.lung_mask"),
    ({"preprocessing": {**PREP, "letterbox_size": "big"}}, "preprocessing.letterbox_size"),
    ({"preprocessing": {**PREP, "letterbox_size": float("inf")}}, "preprocessing.letterbox_size"),
    ({"preprocessing": {**PREP, "mean": [0, 0, 0], "std": [1, 1, 1]}}, "preprocessing.mean"),
    ({"preprocessing": {**PREP, "letterbox_fill": 0}}, "preprocessing.letterbox_fill"),
    ({"model_kwargs": {"num_classes": 2}}, "model_kwargs.num_classes"),
    ({"operating_point": {}}, "operating_point.threshold"),
    ({"operating_point": {"threshold": 0.3, "min_specificity": 5, "chosen_on": "v"}}, "operating_point.min_specificity"),
    ({"operating_point": {"threshold": 0.3, "min_specificity": 0.9, "chosen_on": "v", "temperature": 0}},
     "operating_point.temperature"),
    ({"operating_point": {"threshold": 0.3, "min_specificity": 0.9, "chosen_on": "v", "temperature": "hot"}},
     "operating_point.temperature"),
    ({"training_data": [{"name": "t", "uri": "u", "sha256": None}]}, "training_data[0].sha256"),
    ({"card_version": 99}, "card_version"),
    ({"card_version": "1"}, "card_version"),
    ({"preprocessing_sha256": "0" * 64}, "preprocessing_sha256"),
])
def test_a_bad_card_is_refused_naming_the_field(change, field):
    raw = {**classifier_card().to_dict(), **change}
    with pytest.raises(CardError, match=re.escape(f"field '{field}'")):
        ModelCard.from_dict(raw)


@pytest.mark.parametrize("raw", [[], {"labels": [["a"]]}, {"card_version": 1, "labels": [["nested"]]},
                                 {"task": "classifier", "input": ["x"], "metrics": {"test": {"screening": []}}}])
def test_garbage_is_a_card_error_never_a_crash(raw):
    with pytest.raises(CardError):
        ModelCard.from_dict(raw)


def test_a_missing_field_is_named():
    raw = classifier_card().to_dict()
    del raw["labels"]
    with pytest.raises(CardError, match="field 'labels': missing"):
        ModelCard.from_dict(raw)


def test_a_card_written_before_card_version_1_is_read():
    """The plain-dict cards registered before this module: dilation from the card, the
    operating point from its test metrics, the digest as a dataset."""
    old = {"task": "classifier", "architecture": "resnet18-tiny", "labels": ["covid", "normal"],
           "model_kwargs": {"num_classes": 2}, "input": {"shape": [3, 64, 64], "dtype": "float32"},
           "output": "one logit per label",
           "preprocessing": {"version": "1", "kind": "classifier", "letterbox_size": 64, "letterbox_fill": 128,
                             "grayscale": "8-bit", "channels": 3, "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225], "scale": "x/255", "lung_mask": True,
                             "segmenter_name": "cxr-segmenter", "segmenter_version": "2", "dilation_px": 8,
                             "sha256": "ab"},
           "training_manifest": "out/m.parquet", "training_manifest_sha256": "f" * 64,
           "metrics": {"test": {"screening": {"threshold": 0.4, "min_specificity": 0.85, "chosen_on": "validation"}}},
           "intended_use": "research use, not for diagnosis", "run_id": "r1"}
    card = ModelCard.from_dict(old)
    assert card.preprocessing.dilation_px == 8 and card.preprocessing.segmenter_uri == "models:/cxr-segmenter/2"
    assert card.operating_point.threshold == 0.4 and card.training_data[0].sha256 == "f" * 64


def test_a_segmenter_card_written_before_card_version_1_is_read():
    """Old segmenter cards wrote mean and std as single numbers and the dilation beside them."""
    old = {"task": "segmenter", "architecture": "unet-tiny", "labels": ["lung"], "input": {"shape": [1, 64, 64]},
           "output": "one logit per pixel; sigmoid >= 0.5 is lung",
           "preprocessing": {"version": "1", "kind": "segmenter", "letterbox_size": 64, "letterbox_fill": 128,
                             "grayscale": "8-bit", "channels": 1, "mean": 0.5, "std": 0.25, "scale": "x/255",
                             "sha256": "ab"},
           "mask_dilation_px": 5, "training_manifest_sha256": "e" * 64,
           "metrics": {"test_dice": {"all": {"mean": 0.9, "median": 0.9, "p05": 0.8, "n": 3}}}}
    card = ModelCard.from_dict(old)
    assert card.preprocessing.mean == (0.5,) and card.preprocessing.dilation_px == 5
    assert "| all | 0.900 | 0.900 | 0.800 | 3 |" in model_markdown(card)


def test_preprocessing_digest_ignores_who_pinned_the_segmenter():
    a = Preprocessing.for_classifier(64, True, "seg", "1")
    assert a.sha256 == dataclasses.replace(a, segmenter_version="2").sha256
    assert a.sha256 != dataclasses.replace(a, dilation_px=8).sha256


def test_markdown_card_has_metrics_with_intervals_and_the_operating_point():
    text = model_markdown(classifier_card().validate(), "cxr-classifier", "3")
    assert text.startswith("# resnet18-tiny classifier (cxr-classifier v3)")
    assert "| accuracy | 0.900 [0.800, 1.000] |" in text and "| COVID F1 | n/a |" in text
    assert "covid probability >= 0.3000" in text and "seg v7, dilated 3 px" in text
    assert "COVID AUROC within source=covid (6 vs 5) | 0.600 [0.400, 0.800]" in text
    assert "research use, not for diagnosis" in text.lower() and "nan" not in text.lower()


@pytest.mark.parametrize("dtype,tolerance", [("float32", 0.0), ("bfloat16", 2e-2), ("int8", 3e-2)])
def test_weights_in_each_dtype_load_into_a_float_model(tmp_path, dtype, tolerance):
    torch.manual_seed(0)
    model = build_model("resnet18-tiny", num_classes=4).eval()
    path = save_weights(model, tmp_path / "w.safetensors", dtype)
    again = load_weights(build_model("resnet18-tiny", num_classes=4), path).eval()
    assert stored_dtype(path) == dtype
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        p, q = torch.softmax(model(x), 1), torch.softmax(again(x), 1)
    assert float((p - q).abs().max()) <= tolerance
    if dtype == "float32":
        assert torch.equal(model(x), again(x))


def test_int8_weights_are_a_quarter_of_float32(tmp_path):
    model = build_model("resnet18-tiny", num_classes=4)
    sizes = {d: save_weights(model, tmp_path / f"{d}.safetensors", d).stat().st_size for d in ("float32", "int8")}
    assert sizes["int8"] < 0.3 * sizes["float32"]


def _screen_folder(tmp_path):
    torch.manual_seed(0)
    seg = Component(build_model("unet-tiny"), segmenter_card(), "seg", "7")
    cls = Component(build_model("resnet18-tiny", num_classes=4), classifier_card(), "cls", "3")
    folder = write_screen(tmp_path / "screen", cls, seg)
    write_checksums(folder)
    return folder


def test_screen_folder_checksums_catch_a_changed_and_an_added_file(tmp_path):
    folder = _screen_folder(tmp_path)
    assert verify_checksums(folder) == 6
    (folder / "classifier" / "card.json").write_text((folder / "classifier" / "card.json").read_text() + " ")
    with pytest.raises(PackageError, match="classifier/card.json does not match its checksum"):
        read_screen(folder)
    write_checksums(folder)
    (folder / "extra.json").write_text("{}")
    with pytest.raises(PackageError, match=r"files not in checksums.sha256: \['extra.json'\]"):
        verify_checksums(folder)


def test_a_folder_with_a_pickle_is_refused_before_anything_is_read(tmp_path):
    folder = write_model(tmp_path / "m", build_model("unet-tiny"), segmenter_card())
    (folder / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PackageError, match=r"unexpected files \['model.pt'\]"):
        read_model(folder)


def test_preprocess_refuses_a_segmenter_other_than_the_pinned_one():
    seg = Component(build_model("unet-tiny"), segmenter_card(), "seg", "8")
    with pytest.raises(ValueError, match="trained on lungs cut by models:/seg/7, not by models:/seg/8"):
        Preprocess(classifier_card().preprocessing, seg)
    with pytest.raises(ValueError, match="give it that segmenter"):
        Preprocess(classifier_card().preprocessing, None)


def test_screen_masks_only_a_lung_masked_classifier(tmp_path):
    """A segmenter that finds no lungs: the masked screen's classifier sees zeros, the unmasked
    one the image as it is; both report the (zero) lung fraction."""
    folder = _screen_folder(tmp_path)
    classifier, segmenter, _ = read_screen(folder)
    head = segmenter.model.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)                        # sigmoid(-10): background everywhere
    masked = Screen(classifier, segmenter, "cpu")
    card = dataclasses.replace(classifier.card, preprocessing=Preprocessing.for_classifier(64))
    unmasked = Screen(Component(classifier.model, card), segmenter, "cpu")
    image = torch.from_numpy(np.full((1, 1, 64, 64), 200, np.uint8))
    x_masked, f_masked = masked.preprocess.masked(image, image)
    x_plain, f_plain = unmasked.preprocess.masked(image, image)
    assert torch.equal(x_masked, torch.zeros_like(x_masked))
    assert torch.equal(x_plain, torch.full_like(x_plain, 200.0))
    assert float(f_masked[0]) == float(f_plain[0]) == 0.0


def test_predict_makes_every_odd_input_an_error_row(tmp_path, sample_root):
    """Per-input isolation in the Python API: nothing one input is raises."""
    screen = Screen.from_folder(_screen_folder(tmp_path), "cpu")
    image = sorted((sample_root / "covid").rglob("*.jpg"))[0]
    data = image.read_bytes()
    rows = screen.predict([image, None, 3, "gs://bucket/key.png", b"", bytearray(data), str(tmp_path / "gone.png")])
    assert [s != "error" for s in rows["status"]] == [True, False, False, False, False, True, False]
    assert "not an image path or bytes" in rows["error"][1] and "unsupported URI scheme" in rows["error"][3]
    assert rows["sha256"][0] == rows["sha256"][5]                     # a path and its bytes: the same image
    # An encoded buffer (what cv2.imencode returns) is one image, not one input per byte.
    assert len(screen.predict(np.frombuffer(data, np.uint8))) == 1
    # A DataFrame: bytes where a row has them, else its path; NaN is missing, not an input.
    frame = screen.predict(__import__("pandas").DataFrame({"image": [data, float("nan")], "path": [None, str(image)]}))
    assert list(frame["uri"]) == ["<bytes #0>", str(image)] and set(frame["status"]) <= {"ok", "flagged"}
    no_heatmaps = screen.predict([image], heatmap_size=0)
    assert no_heatmaps["heatmap_png"][0] is None and no_heatmaps["probabilities"][0] is not None


def test_a_bundle_without_checksums_or_with_a_link_is_refused(tmp_path):
    folder = _screen_folder(tmp_path)
    (folder / "checksums.sha256").unlink()
    with pytest.raises(PackageError, match="no checksums.sha256"):
        read_screen(folder)
    write_checksums(folder)
    (folder / "segmenter" / "card.json").unlink()
    (folder / "segmenter" / "card.json").symlink_to(folder / "classifier" / "card.json")
    with pytest.raises(PackageError, match=r"links \['segmenter/card.json'\]"):
        read_screen(folder)


def test_a_tar_bundle_with_a_link_is_refused(tmp_path):
    import tarfile

    from cxr.workflows.screen import unpack_bundle

    folder = _screen_folder(tmp_path)
    bundle = tmp_path / "b.tar"
    with tarfile.open(bundle, "w") as tar:
        tar.add(folder, arcname="b")
        link = tarfile.TarInfo("b/classifier/evil.json")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(link)
    with pytest.raises(PackageError, match="links or special files"):
        unpack_bundle(bundle, tmp_path / "out")


@pytest.mark.parametrize("metrics", [
    {"test": {"screening": "oops"}},
    {"test": {"screening": {"archives": {"a": {"n_covid": 1}}}}},
    {"cross_archive": {"held_out": [{"report": {}}, "x"]}},
    {"calibration": {"after": "x"}},
])
def test_markdown_survives_odd_metrics(metrics):
    card = dataclasses.replace(classifier_card(), metrics=metrics)
    assert model_markdown(card).startswith("#")


def test_markdown_shows_the_temperature_and_the_cross_archive_table():
    card = dataclasses.replace(classifier_card(), operating_point=OperatingPoint(0.3, 0.85, "validation", "covid", 1.7),
                               metrics={"cross_archive": {"recipe": "screen", "held_out": [
                                   {"archive": "jsrt", "report": {"n_covid": 0, "n_other": 9, "specificity": {
                                       "value": 0.9, "low": 0.8, "high": 1.0}}}]}})
    text = model_markdown(card)
    assert "calibrated with temperature 1.700" in text and "| jsrt | 0 / 9 | n/a | n/a | 0.900 [0.800, 1.000] |" in text


def test_cards_and_the_shipped_bundle_carry_no_machine_paths(tmp_path, monkeypatch):
    import json
    import os

    from cxr.card import portable
    from cxr.config import REPO_ROOT

    monkeypatch.setenv("CXR_DATA", str(tmp_path / "data"))
    assert portable(str(REPO_ROOT / "out" / "manifests" / "x.parquet")) == "out/manifests/x.parquet"
    assert portable(str(tmp_path / "data" / "fullres" / "a.png")) == "$CXR_DATA/fullres/a.png"
    assert portable(str(tmp_path / "elsewhere" / "m.parquet")) == "m.parquet"
    assert portable({"a": ["s3://b/k.parquet", "models:/m/1", 3]}) == {"a": ["s3://b/k.parquet", "models:/m/1", 3]}

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    bundle = REPO_ROOT / "models" / "cxr-screen"
    found = [(p.name, s) for p in bundle.rglob("*.json") for s in strings(json.loads(p.read_text()))
             if os.path.isabs(s) or "/work/" in s or "/home/" in s]
    assert found == []
