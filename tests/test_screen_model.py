"""One model package from training to serving, against the loopback MLflow servers: the
screen registered as one MLflow model (mlflow.pyfunc and cxr.load agree), cxr score and cxr
evaluate giving the same probabilities for masked and unmasked classifiers, and bundles moved
between two registries with identical predictions."""

from __future__ import annotations

import json
import os
import tarfile

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import cxr
from cxr import tracking
from cxr.config import EvaluateConfig, ExportModelConfig, ImportModelConfig, ScoreConfig, load_platform
from cxr.scores_table import read_scores
from cxr.workflows.screen import register_screen
from infra.local.stack import LocalStack
from jobs import evaluate, export_model, import_model, score
from tests.conftest import own_platform


def _images(sample_root, n: int = 6) -> list[str]:
    return [str(p) for p in sorted((sample_root / "covid").rglob("*.jpg"))[:n // 2]
            + sorted((sample_root / "kermany").rglob("*.jpg"))[:n - n // 2]]


@pytest.fixture(scope="module")
def names(tmp_path_factory, local_stack):
    with own_platform(tmp_path_factory.mktemp("platform"), "screen") as names:
        yield names


@pytest.fixture(scope="module")
def screen_uri(names, tiny_models) -> str:
    """The screen of the lung-masked tiny classifier, registered and aliased champion."""
    register_screen(load_platform(), tiny_models["classifier"], alias="champion")
    return f"models:/{names['screen']}@champion"


def test_mlflow_pyfunc_and_cxr_load_give_the_same_rows(screen_uri, tiny_models, sample_root):
    images = _images(sample_root)
    model = mlflow.pyfunc.load_model(screen_uri)
    by_path = model.predict(pd.DataFrame({"path": images}))
    by_bytes = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in images]}))
    api = cxr.load(screen_uri).predict(images)
    for frame in (by_path, by_bytes):
        assert list(frame["status"]) == ["ok"] * len(images) or set(frame["status"]) <= {"ok", "flagged"}
        np.testing.assert_allclose(np.stack(frame["probabilities"]), np.stack(api["probabilities"]), atol=1e-6)
        assert list(frame["heatmap_png"]) == list(api["heatmap_png"])
    assert list(by_path["sha256"]) == list(by_bytes["sha256"]) == list(api["sha256"])
    # A row with both a path and image bytes is an error row (which was meant?), the others scored.
    both = cxr.load(screen_uri).predict(pd.DataFrame({"path": [images[0], None],
                                                      "image": [open(images[1], "rb").read()] * 2}))
    assert both["status"][0] == "error" and both["status"][1] in ("ok", "flagged")
    assert "both a path and image bytes" in both["error"][0] and pd.isna(both["error"][1])
    # The fields of a scores row, with the card's operating point applied.
    row = api.iloc[0]
    assert row["labels"] == ["covid", "normal", "bacterial", "viral"] and row["covid_threshold"] == 0.25
    assert row["screen_positive"] == (row["covid_probability"] >= 0.25) and 0 <= row["lung_fraction"] <= 1
    assert row["classifier"] == tiny_models["classifier"][len("models:/"):]
    # A real signature (inputs, outputs, params) and an input example.
    info = mlflow.models.get_model_info(screen_uri)
    assert [c.name for c in info.signature.inputs] == ["path", "image"]
    assert {"probabilities", "screen_positive", "heatmap_png", "qc_flags"} <= {c.name for c in info.signature.outputs}
    assert info.saved_input_example_info["type"] == "dataframe"


def test_a_bad_input_is_an_error_row_not_an_exception(screen_uri, sample_root, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    rows = cxr.load(screen_uri).predict([str(tmp_path / "notes.jpg"), str(tmp_path / "missing.png"),
                                         *_images(sample_root, 1)])
    assert list(rows["status"][:2]) == ["error", "error"] and rows["status"][2] in ("ok", "flagged")
    assert "not an image" in rows["error"][0] and rows["probabilities"][0] is None


@pytest.mark.parametrize("which", ["classifier", "classifier_nomask"])
def test_score_and_evaluate_give_the_same_probabilities(which, tiny_models, sample_manifests, ray_local, tmp_path):
    """The one Preprocess: a lung-masked and an unmasked classifier, scored by the Ray job and
    evaluated by cxr evaluate on the same images, give the same probabilities. (The scorer
    once masked every image, so an unmasked classifier saw lungs it was never trained on.)"""
    manifest = sample_manifests / "tasks" / "dataset2-4class.parquet"
    assert evaluate.main(EvaluateConfig(manifest=str(manifest), classifier=tiny_models[which], out=str(tmp_path / "ev"),
                                        n_boot=20, cam_examples=0, load_threads=2)) == 0
    evaluated = pd.read_csv(tmp_path / "ev" / "predictions.csv").set_index("uri")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["lung_mask"] == (which == "classifier")
    inputs = tmp_path / "inputs.parquet"
    pd.DataFrame({"uri": list(evaluated.index)}).to_parquet(inputs)
    summary = score.run(ScoreConfig(input=str(inputs), output=str(tmp_path / "scores"), segmenter=tiny_models["segmenter"],
                                    classifier=tiny_models[which], batch_size=4))
    assert summary["scored"] == len(evaluated)
    scored = read_scores(str(tmp_path / "scores")).to_pandas().set_index("uri").loc[evaluated.index]
    ours = np.stack(scored["probabilities"])
    theirs = evaluated[["p_covid", "p_normal", "p_bacterial", "p_viral"]].to_numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert scored["lung_fraction"].notna().all()      # the quality signal, masked or not


def test_bundle_round_trip_between_two_registries(screen_uri, names, sample_root, tmp_path, capsys):
    images = _images(sample_root)
    expected = cxr.load(screen_uri).predict(images)
    bundle = tmp_path / "bundle.tar"
    assert export_model.main(ExportModelConfig(model=screen_uri, out=str(bundle))) == 0
    with tarfile.open(bundle) as tar:
        assert {"bundle/screen.json", "bundle/checksums.sha256", "bundle/MODEL_CARD.md",
                "bundle/classifier/model.safetensors", "bundle/segmenter/card.json"} <= set(tar.getnames())
    # Cut in parts for a transfer limited per file, it is the same bundle once joined.
    size = bundle.stat().st_size
    assert export_model.main(ExportModelConfig(model=screen_uri, out=str(tmp_path / "parts" / "bundle.tar"),
                                               part_mb=size / 3 / 2**20 + 0.01)) == 0
    parts = sorted((tmp_path / "parts").iterdir())
    assert [p.name for p in parts] == ["bundle.tar.000", "bundle.tar.001", "bundle.tar.002"]
    assert all(p.stat().st_size <= size / 3 + 0.01 * 2**20 for p in parts)
    # A second, empty registry (another MLflow server on loopback).
    other = LocalStack(tmp_path / "other-stack").start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", other.tracking_uri)
            assert import_model.main(ImportModelConfig(bundle=str(parts[0]), alias="champion")) == 0
            assert "v1" in capsys.readouterr().out
            imported = f"models:/{names['screen']}@champion"
            again = cxr.load(imported, tracking_uri=other.tracking_uri).predict(images)
            by_pyfunc = mlflow.pyfunc.load_model(imported).predict(pd.DataFrame({"path": images}))
            # The imported classifier pins the imported segmenter, and says where it came from.
            card = tracking.load_card(other.tracking_uri, f"models:/{names['classifier']}@champion")
            assert card.preprocessing.segmenter_uri == f"models:/{names['segmenter']}/1"
            imported = card.provenance["import"]
            assert imported["bundle"] == "bundle.tar.000" and imported["source_version"]
        np.testing.assert_array_equal(np.stack(again["probabilities"]), np.stack(expected["probabilities"]))
        np.testing.assert_array_equal(np.stack(by_pyfunc["probabilities"]), np.stack(expected["probabilities"]))
        assert list(again["heatmap_png"]) == list(expected["heatmap_png"])
    finally:
        other.stop()


def test_a_tampered_bundle_is_refused(screen_uri, names, tmp_path, capsys):
    folder = tmp_path / "bundle"
    assert export_model.main(ExportModelConfig(model=screen_uri, out=str(folder), dtype="bfloat16")) == 0
    assert cxr.load(folder).predict([]).empty           # the folder itself loads
    weights = folder / "classifier" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert import_model.main(ImportModelConfig(bundle=str(folder))) == 2
    assert "classifier/model.safetensors does not match its checksum" in capsys.readouterr().err
    client = MlflowClient(load_platform().tracking_uri)
    assert client.search_model_versions(f"name='{names['classifier']}'") == []      # nothing registered
    (folder / "classifier" / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match=r"unexpected files \['classifier/model.pt'\]"):
        cxr.load(folder)
    assert not os.path.exists(tmp_path / "pwned")


def _site_csv(sample_root, tmp_path, n_covid: int, n_other: int):
    """A site's labelled sample: the sample's COVID images, and adult normals as the others."""
    covid = sorted((sample_root / "covid").rglob("*.jpg"))[:n_covid]
    other = sorted((sample_root / "lungseg").rglob("*.jpg"))[:n_other]
    rows = [(str(p), ["covid", "COVID-19 ", "Covid"][i % 3], f"c{i}") for i, p in enumerate(covid)] + \
           [(str(p), "normal", f"o{i}") for i, p in enumerate(other)]
    path = tmp_path / "site.csv"
    pd.DataFrame(rows, columns=["path", "label", "patient_id"]).to_csv(path, index=False)
    return path, [str(p) for p in other]


def test_calibrate_fits_a_site_and_registers_it_for_that_site(names, tiny_models, sample_root, tmp_path, capsys):
    from cxr.config import CalibrateConfig
    from jobs import calibrate

    site_csv, negatives = _site_csv(sample_root, tmp_path, 12, 30)
    kept_apart = tmp_path / "check.csv"
    others = sorted((sample_root / "kermany").rglob("*.jpg"))[:8]
    pd.DataFrame({"path": [str(p) for p in others], "label": "normal", "patient_id": range(8)}).to_csv(kept_apart)
    out = tmp_path / "calibration.json"
    cfg = CalibrateConfig(manifest=str(site_csv), model=tiny_models["classifier_nomask"], site="hospital-b",
                          specificity=0.9, alias="site-b", n_boot=50, load_threads=2, check=str(kept_apart),
                          out=str(out))
    assert calibrate.main(cfg) == 0
    printed = capsys.readouterr().out
    assert "site hospital-b: 12 COVID and 30 other images" in printed and "local negatives needed" in printed
    result = json.loads(out.read_text())
    assert result["check"]["n_other"] == 8 and "specificity" in result["check"]["before"]
    assert "kept-apart check (0 COVID, 8 other)" in printed
    assert result["after"]["temperature_fitted"] and result["curve"][0]["n"] == 10
    platform = load_platform()
    card = tracking.load_registered(platform.tracking_uri, result["classifier"]).card
    op = card.operating_point
    assert op.chosen_on.startswith("site hospital-b: 30 local negatives") and op.min_specificity == 0.9
    assert op.temperature == pytest.approx(result["after"]["temperature"])
    assert op.threshold == result["after"]["threshold"]
    assert card.metrics["calibration"]["sample_sha256"] == result["sample_sha256"]
    assert "screening" not in card.metrics.get("test", {})        # the old threshold's figures are gone
    name, version = result["classifier"][len("models:/"):].split("/")
    description = MlflowClient(platform.tracking_uri).get_model_version(name, version).description
    assert "## Calibrated for a site" in description and "| hospital-b |" in description
    alias = MlflowClient(platform.tracking_uri).get_model_version_by_alias(names["screen"], "site-b")
    assert result["screen"] == f"models:/{names['screen']}/{alias.version}"
    # The registered screen applies the new temperature and threshold: on the site's own
    # negatives it reaches the specificity asked for.
    rows = cxr.load(result["screen"]).predict(negatives)
    assert (~rows["screen_positive"].astype(bool)).mean() >= 0.9
    scores = rows["covid_probability"].to_numpy()
    assert (scores < op.threshold).mean() == pytest.approx(result["after"]["specificity"]["value"])


def test_calibrate_refuses_a_sample_too_small_to_place_a_threshold(tiny_models, sample_root, tmp_path, capsys):
    from cxr.config import CalibrateConfig
    from jobs import calibrate

    site_csv, _ = _site_csv(sample_root, tmp_path, 5, 6)
    small = CalibrateConfig(manifest=str(site_csv), model=tiny_models["classifier_nomask"], site="x")
    assert calibrate.main(small) == 2
    assert "6 labelled non-COVID images; a threshold needs at least 10" in capsys.readouterr().err
    # The same negative twelve times is one image, not twelve.
    one = str(sorted((sample_root / "lungseg").rglob("*.jpg"))[0])
    pd.DataFrame({"path": [one] * 12, "label": "normal", "patient_id": "p"}).to_csv(tmp_path / "dup.csv", index=False)
    assert calibrate.main(CalibrateConfig(manifest=str(tmp_path / "dup.csv"), model=tiny_models["classifier_nomask"],
                                          site="x")) == 2
    assert "1 labelled non-COVID images" in capsys.readouterr().err
    # An unreadable file: one line, exit 2.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = [str(p) for p in sorted((sample_root / "lungseg").rglob("*.jpg"))[:11]]
    pd.DataFrame({"path": good + [str(broken)], "label": "normal", "patient_id": range(12)}).to_csv(
        tmp_path / "broken.csv", index=False)
    assert calibrate.main(CalibrateConfig(manifest=str(tmp_path / "broken.csv"), model=tiny_models["classifier_nomask"],
                                          site="x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr calibrate: an image of the sample cannot be used") and len(err.splitlines()) == 1
    big_csv, _ = _site_csv(sample_root, tmp_path, 5, 20)
    assert calibrate.main(CalibrateConfig(manifest=str(big_csv), model=tiny_models["classifier_nomask"], site="x",
                                          check=str(big_csv))) == 2
    assert "shares images with" in capsys.readouterr().err
