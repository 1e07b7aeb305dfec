"""The screen shipped in ``models/cxr-screen``: a verified bundle within its size, carrying its
cross-archive figures, which ``cxr bootstrap`` imports as champion into an empty registry, and
which tells the sample's classes apart."""

import json
from pathlib import Path

from cxr.card import ModelCard
from cxr.config import BootstrapConfig, load_platform
from cxr.package import folder_bytes, read_screen
from cxr.workflows.promotion import alias_version
from experiments import shipped_model
from jobs import bootstrap
from tests.conftest import own_platform

BUNDLE = shipped_model.BUNDLE


def test_the_shipped_bundle_verifies_and_carries_its_cross_archive_figures():
    classifier, segmenter, info = read_screen(BUNDLE)         # checksums, cards, safe files only
    assert info["weights_dtype"] == "int8" and folder_bytes(BUNDLE) <= 64 * 2**20
    assert segmenter is not None and classifier.card.operating_point is not None
    card: ModelCard = classifier.card
    held_out = card.metrics["cross_archive"]["held_out"]
    assert len({r["archive"] for r in held_out}) >= 5
    for row in held_out:      # each reported by a model that never trained on it ("none held out": no fold did)
        assert row["fold"] in {"yes", "none held out"}
        assert row["report"]["specificity"]["low"] <= row["report"]["specificity"]["value"]
    assert "not for diagnosis" in (BUNDLE / "MODEL_CARD.md").read_text()


def test_bootstrap_imports_the_shipped_screen_as_champion_once_and_it_screens_a_pacs_export(
        local_stack, ray_local, tmp_path, monkeypatch):
    """Imported as champion, then the nightly job on real DICOMs made from a sample film with a
    modality's tags (PA, AP, lateral, CT, a hand), a photo and noise: identifiers in the rows,
    lateral / CT / hand skipped with reasons, the photo and noise flagged by the screen's quality
    control, and SRs that read back with the scored images' UIDs."""
    import pandas as pd

    from cxr.config import ExportSRConfig, ReportConfig, ScoreConfig
    from cxr.dicom_sr import read_back
    from cxr.scores_table import read_scores
    from jobs import export_sr, report, score
    from tests.test_one_answer import assert_one_answer
    from tests.inputs import real_gray
    from tests.test_dicom_routing import write_archive

    with own_platform(tmp_path, "shipped") as names:
        assert bootstrap.main(BootstrapConfig()) == 0
        platform = load_platform()
        alias = platform.aliases["champion"]
        versions = {k: alias_version(platform.tracking_uri, names[k], alias) for k in names}
        assert all(versions.values()), versions
        assert bootstrap.main(BootstrapConfig()) == 0                  # champions exist: nothing new
        assert {k: alias_version(platform.tracking_uri, names[k], alias) for k in names} == versions

        monkeypatch.setenv("CXR_PSEUDONYM_KEY", "site-secret")
        (tmp_path / "archive").mkdir()
        write_archive(tmp_path / "archive", real_gray())
        out = str(tmp_path / "scores")
        assert score.main(ScoreConfig(input=str(tmp_path / "archive"), output=out, batch_size=8,
                                      classifier=f"models:/{names['classifier']}@{alias}",
                                      segmenter=f"models:/{names['segmenter']}@{alias}")) == 0
        rows = read_scores(out).to_pandas().set_index("uri")
        rows.index = [u.rsplit("/", 1)[1] for u in rows.index]
        assert (rows.loc[["lateral.dcm", "ct.dcm", "hand.dcm"], "status"] == "skipped").all()
        assert (rows.loc[["photo.jpg", "noise.png"], "status"] == "flagged").all()
        assert rows.loc[["photo.jpg", "noise.png"], "screen_positive"].isna().all()
        assert rows.loc["pa.dcm", "patient_id"].startswith("pseudo-") and rows.loc["ap", "modality"] == "DX"
        assert export_sr.main(ExportSRConfig(scores=out, out=str(tmp_path / "sr"))) == 0
        assert report.main(ReportConfig(scores=out, out=str(tmp_path / "report.html"))) == 0
    scored_dicoms = rows[rows["sop_instance_uid"].notna() & rows["status"].isin(["ok", "flagged"])]
    back = [b for p in (tmp_path / "sr").glob("*.dcm") for b in read_back(p)]
    assert sorted(b["sop_instance_uid"] for b in back) == sorted(scored_dicoms["sop_instance_uid"])
    assert pd.read_csv(tmp_path / "sr" / "errors.csv").empty
    # One answer per film: the rows, the review page, the worklist and the SRs agree.
    assert_one_answer(read_scores(out).to_pandas(), (tmp_path / "report.html").read_text(),
                      pd.read_csv(tmp_path / "sr" / "worklist.csv"), back)


def test_the_shipped_screen_tells_the_sample_apart(sample_root, tmp_path):
    """In-distribution (the sample comes from its training archives): a broken or mismatched
    bundle (weights, preprocessing, labels) lands near chance here."""
    result = shipped_model.evaluate(BUNDLE, sample_root, None, None, n_boot=200)
    assert result["all"]["accuracy"] >= 0.7
    assert result["all"]["covid_auroc"]["low"] > 0.8
    json.dumps(result, default=str)


def test_the_shipped_screen_flags_a_photo_and_noise_and_keeps_adult_films(sample_root):
    """Its quality control (cxr.qc, fitted by experiments/fit_qc.py): a photo and noise are flagged as
    not frontal chest films, so not screened; adult chest films of the sample are not flagged."""
    import matplotlib
    import numpy as np

    from cxr.qc import BLOCKING
    from cxr.screen import Screen
    from tests.inputs import png_bytes

    photo = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    adults = sorted((sample_root / "lungseg" / "images").glob("*.*"))[:8]
    screen = Screen.from_folder(BUNDLE, "cpu")
    assert screen.qc is not None
    rows = screen.predict([photo, noise, *map(str, adults)], heatmap_size=None)
    assert list(rows["status"][:2]) == ["flagged", "flagged"]
    assert all(set(f) & BLOCKING for f in rows["qc_flags"][:2])    # not a frontal chest film, whichever detector
    assert rows["screen_positive"][:2].isna().all() and rows["predicted_label"][:2].isna().all()   # not screened
    assert (rows["status"][2:] == "ok").mean() >= 0.8, rows[["uri", "qc_flags"]]
