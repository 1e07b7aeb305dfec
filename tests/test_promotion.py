"""Promotion against the loopback MLflow server: two versions registered; a passing promotion
moves the aliases and writes the audit record; a planted worse model changes nothing and says
why; rollback; a promotion while another holds the lock is refused cleanly."""

import json

import pytest
import yaml
from mlflow import MlflowClient

from cxr import tracking
from cxr.config import REPO_ROOT, PromoteConfig, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.promotion import PromotionLock, alias_version
from jobs import promote
from tests.conftest import unique_models
from tests.models import register_classifier

NAMES = unique_models("promo")
MODEL = NAMES["classifier"]


@pytest.fixture(scope="module")
def platform_file(local_stack, sample_manifests, tiny_models, tmp_path_factory):
    """mlflow.yaml for these tests: its own model name, and gates frozen on the sample's test split."""
    manifest = sample_manifests / "tasks" / "dataset2-4class.parquet"
    rows = read_manifest(str(manifest))
    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    raw["registered_models"] = {**raw["registered_models"], **NAMES}
    raw["promotion"].update(n_boot=200, classifier={
        "evaluation_manifest": str(manifest), "evaluation_split": "test",
        "evaluation_sha256": manifest_digest(rows[rows["split"] == "test"]),
        "gates": {"covid_sensitivity": 0.5}, "non_inferiority": {"metric": "accuracy", "margin": 0.05}})
    path = tmp_path_factory.mktemp("platform") / "mlflow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def use_platform(platform_file, monkeypatch):
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(platform_file))


def _register_rigged(always: str, tiny_models, tmp_path) -> str:
    """A real registered classifier whose head always answers ``always``: a model of known quality."""
    uri = register_classifier(load_platform().tracking_uri, MODEL, tiny_models["segmenter"], always=always)
    return uri.rsplit("/", 1)[1]


def _screen_champion() -> str | None:
    version = alias_version(load_platform().tracking_uri, NAMES["screen"], "champion")
    return MlflowClient(load_platform().tracking_uri).get_model_version(NAMES["screen"], version).tags[
        "cxr.classifier"] if version else None


def _aliases() -> tuple[str | None, str | None]:
    uri = load_platform().tracking_uri
    return alias_version(uri, MODEL, "champion"), alias_version(uri, MODEL, "previous-champion")


def test_promotion_lifecycle(tiny_models, tmp_path_factory, capsys):
    uri = load_platform().tracking_uri
    client = MlflowClient(uri)
    first = _register_rigged("covid", tiny_models, tmp_path_factory.mktemp("a"))
    second = _register_rigged("covid", tiny_models, tmp_path_factory.mktemp("b"))
    worse = _register_rigged("normal", tiny_models, tmp_path_factory.mktemp("c"))

    # No champion yet: the gates alone decide.
    assert promote.main(PromoteConfig(model=MODEL, version=first, reason="first", user="alice")) == 0
    assert _aliases() == (first, None)
    # The screen's champion follows the classifier's: the screen of that version, registered for it.
    assert _screen_champion() == f"{MODEL}/{first}"
    # A second version, not worse than the champion: champion moves, the old one is kept.
    assert promote.main(PromoteConfig(model=MODEL, version=second, user="bob")) == 0
    assert _aliases() == (second, first)
    tags = client.get_model_version(MODEL, second).tags
    assert tags["promoted_by"] == "bob" and "promotion_run_id" in tags
    audit = json.loads(client.get_registered_model(MODEL).tags["last_promotion"])
    assert audit["before"]["champion"] == first and audit["after"]["champion"] == second
    history = tracking.client(uri).download_artifacts(tags["promotion_run_id"], "history.json", str(tmp_path_factory.mktemp("h")))
    assert [r["after"]["champion"] for r in json.load(open(history))] == [first, second]
    capsys.readouterr()

    # A planted worse model: rejected, nothing changes, the reason in one line.
    assert promote.main(PromoteConfig(model=MODEL, version=worse)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"v{worse} rejected, nothing changed" in err and "covid_sensitivity lower bound" in err
    assert _aliases() == (second, first)
    assert "promoted_at" not in client.get_model_version(MODEL, worse).tags

    assert _screen_champion() == f"{MODEL}/{second}"

    # Rollback: the screen follows back, to the screen registered for the first version.
    screens = len(client.search_model_versions(f"name='{NAMES['screen']}'"))
    assert promote.main(PromoteConfig(model=MODEL, rollback=True, reason="incident 42")) == 0
    assert _aliases() == (first, second)
    assert _screen_champion() == f"{MODEL}/{first}"
    assert len(client.search_model_versions(f"name='{NAMES['screen']}'")) == screens

    # Another promotion holds the lock: refused cleanly, aliases untouched.
    with PromotionLock(uri, MODEL, ttl_s=3600, owner="carol"):
        assert promote.main(PromoteConfig(model=MODEL, version=second)) == 1
        err = capsys.readouterr().err
        assert "another promotion" in err and "carol" in err
        assert _aliases() == (first, second)
    # The lock is released: the same promotion now goes through.
    assert promote.main(PromoteConfig(model=MODEL, version=second)) == 0
    assert _aliases() == (second, first)


def test_frozen_evaluation_set_is_enforced(tiny_models, platform_file, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(platform_file.read_text())
    raw["promotion"]["classifier"]["evaluation_sha256"] = "0" * 64
    changed = tmp_path / "mlflow.yaml"
    changed.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(changed))
    version = _register_rigged("covid", tiny_models, tmp_path / "m")
    before = _aliases()
    assert promote.main(PromoteConfig(model=MODEL, version=version)) == 1
    assert "frozen evaluation set changed" in capsys.readouterr().err
    assert _aliases() == before
