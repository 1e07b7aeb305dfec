"""Each night against the model's own reference (``cxr.monitoring``, ``cxr.workflows.monitor``):
the comparison itself, and a real score job that is an MLflow run, quiet on an unshifted night,
exit 3 with the drift named on a shifted one, and the review page's trend."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.monitoring import Limits, Reference, compare, fit_reference

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "cxr-screen"


def _reference(rng, n=400) -> Reference:
    return fit_reference({"covid_probability": rng.beta(0.5, 2.0, n), "flagged": (rng.random(n) < 0.1) * 1.0}, "x")


def test_a_night_like_the_reference_is_not_flagged_and_a_shifted_one_is():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    same = compare(ref, {"covid_probability": rng.beta(0.5, 2.0, 300), "flagged": (rng.random(300) < 0.1) * 1.0})
    assert not any(c.drifted for c in same) and all(c.psi < 0.1 for c in same)
    shifted = compare(ref, {"covid_probability": rng.beta(2.0, 0.5, 300), "flagged": (rng.random(300) < 0.5) * 1.0})
    assert all(c.drifted for c in shifted), shifted
    assert all(c.p_value < 1e-6 for c in shifted)


def test_drift_needs_both_a_large_shift_and_a_real_one():
    rng = np.random.default_rng(1)
    ref = fit_reference({"lung_fraction": rng.normal(0.25, 0.05, 20_000)}, "x")
    # A huge night with a trivial shift: the test alone would call it (p tiny); PSI says it is small.
    big = compare(ref, {"lung_fraction": rng.normal(0.26, 0.05, 200_000)})[0]
    assert big.p_value < 1e-3 and big.psi < 0.05 and not big.drifted
    # A small night: PSI reads high from noise alone; the test says it is not evidence.
    small = compare(ref, {"lung_fraction": rng.normal(0.25, 0.05, 31)})[0]
    assert small.p_value > 1e-3 and not small.drifted
    # Too few films are not judged at all.
    few = compare(ref, {"lung_fraction": rng.normal(0.5, 0.05, 10)}, Limits(min_images=30))[0]
    assert few.psi is None and not few.drifted and "too few" in few.note


def test_the_reference_travels_as_json():
    ref = _reference(np.random.default_rng(2))
    back = Reference.from_json(ref.to_json())
    assert back == ref and back.without("flagged").measures.keys() == {"covid_probability"}


# --- a real night ----------------------------------------------------------------------------

def _films(sample_root: Path) -> tuple[list[Path], list[Path]]:
    """Two disjoint halves of the sample's real films, drawn at random (seeded): the
    reference's and the nights', from one population."""
    films = sorted((sample_root / "covid" / "images").iterdir()) + sorted((sample_root / "kermany").rglob("*.jp*g"))
    order = np.random.default_rng(7).permutation(len(films))
    half = len(films) // 2
    return [films[i] for i in order[:half]], [films[i] for i in order[half:]]


def _write_night(films: list[Path], folder: Path, gamma: float | None = None) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(films):
        image = np.asarray(Image.open(f).convert("L"), np.float32) / 255
        if gamma is not None:       # a scanner whose processing changed: washed-out midtones
            image = image ** gamma
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{i:03d}-{f.stem}.png")


@pytest.fixture(scope="module")
def monitored(local_stack, ray_local, sample_root, tmp_path_factory):
    """The shipped screen with its reference refitted on half the sample's films, imported as
    champion under names of its own; yields (names, the other half's films, a folder)."""
    from cxr.config import load_platform
    from cxr.package import read_screen, write_checksums, write_reference
    from cxr.workflows.monitor import fit_screen_reference
    from cxr.workflows.screen import import_model
    from tests.conftest import own_platform

    tmp = tmp_path_factory.mktemp("monitored")
    bundle = tmp / "bundle"
    shutil.copytree(BUNDLE, bundle)
    reference_films, night_films = _films(sample_root)
    classifier, segmenter, _ = read_screen(bundle)
    write_reference(bundle / "classifier", fit_screen_reference(
        classifier, segmenter, [str(f) for f in reference_films], None, "sample reference half"))
    write_checksums(bundle)
    with own_platform(tmp, "monitored") as names:
        import_model(load_platform(), bundle, alias="champion")
        yield names, night_films, tmp


def _night(names: dict, folder: Path, out: Path, capsys) -> tuple[int, str]:
    from jobs.cli import main as cli

    code = cli(["score", "--input", str(folder), "--output", str(out), "--batch-size", "16",
                "--classifier", f"models:/{names['screen']}@champion"])
    return code, capsys.readouterr().err


def test_a_night_is_a_monitored_run_quiet_when_unshifted_and_exit_3_when_shifted(monitored, capsys):
    from cxr import tracking
    from cxr.config import load_platform
    from cxr.workflows import monitor
    from jobs.cli import main as cli

    names, films, tmp = monitored
    platform = load_platform()
    _write_night(films, tmp / "plain")
    code, err = _night(names, tmp / "plain", tmp / "scores-plain", capsys)
    assert code == 0 and "ALARM" not in err, err
    runs = tracking.search_runs(platform.tracking_uri, monitor.experiment_name(platform, str(tmp / "scores-plain")))
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert m["scored"] == len(films) and m["status.ok"] + m.get("status.flagged", 0) == len(films)
    assert m["bytes_read"] > 0 and m["images_per_s"] > 0 and m["drifted_measures"] == 0
    assert {"drift.covid_probability.psi", "drift.lung_fraction.psi", "drift.qc.distance.psi"} <= m.keys()
    assert runs[0].data.params["input"] == str(tmp / "plain")

    _write_night(films, tmp / "washed-out", gamma=0.3)
    code, err = _night(names, tmp / "washed-out", tmp / "scores-shifted", capsys)
    assert code == 3, err
    assert "ALARM: drift from the model's reference" in err and "qc.distance" in err
    run = tracking.search_runs(platform.tracking_uri, monitor.experiment_name(platform, str(tmp / "scores-shifted")))[0]
    assert run.data.metrics["drifted_measures"] >= 1 and run.data.tags["cxr.alarm"].startswith("drift")

    # A retry scores nothing: a run with no films is recorded, not judged, not an alarm, and the
    # page still shows the night that raised it, with the trend of the nights that scored films.
    code, err = _night(names, tmp / "washed-out", tmp / "scores-shifted", capsys)
    assert code == 0 and "ALARM" not in err
    page = tmp / "shifted.html"
    assert cli(["report", "--scores", str(tmp / "scores-shifted"), "--job-id", "all", "--out", str(page),
                "--trend", "5"]) == 0
    html = page.read_text()
    assert "ALARM: drift from the model&#39;s reference" in html and "qc.distance" in html
    assert "The last 1 nights of this table" in html and "data:image/png;base64," in html
    assert f"MLflow run {run.info.run_id}" in html


def test_an_error_share_above_its_bound_exits_3(monitored, tmp_path, capsys):
    names, films, _ = monitored
    folder = tmp_path / "broken"
    _write_night(films[:4], folder)
    for i in range(2):
        (folder / f"truncated-{i}.png").write_bytes((folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()[:200])
    code, err = _night(names, folder, tmp_path / "scores", capsys)
    assert code == 3 and "2 of 6 inputs are error rows" in err, err



def test_a_night_whose_monitoring_fails_after_its_rows_are_written_exits_3_with_its_rows(monitored, tmp_path,
                                                                                       monkeypatch, capsys):
    from cxr.scores_table import read_scores
    from cxr.workflows import monitor

    names, films, _ = monitored

    def unreachable(*_, **__):
        raise ConnectionError("MLflow went away")

    monkeypatch.setattr(monitor.tracking, "tracked_run", unreachable)
    _write_night(films[:3], tmp_path / "in")
    code, err = _night(names, tmp_path / "in", tmp_path / "scores", capsys)
    assert code == 3 and "monitoring was not recorded (ConnectionError: MLflow went away)" in err, err
    assert read_scores(str(tmp_path / "scores")).num_rows == 3


def test_metric_names_mlflow_accepts_and_references_that_do_not_fit_are_refused():
    from cxr.workflows.monitor import metric_name

    assert metric_name("label.covid (x)") == "label.covid _x_" and metric_name("flag.a/../b") == "flag.a___b"
    broken = _reference(np.random.default_rng(3)).to_json().replace('"counts": [', '"counts": [1, ', 1)
    with pytest.raises(ValueError, match="bins"):
        Reference.from_json(broken)
    assert compare(_reference(np.random.default_rng(4)), {}, Limits(min_images=0))[0].psi is None
