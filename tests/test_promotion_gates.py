"""The gates of mlflow.yaml on the shipped screen, in a demo registry (the sample's gate set):
the unchanged champion, exported and re-imported, is promotable; the same bundle with its
card's threshold edited and its checksums recomputed imports (checksums only catch
corruption), is refused by --require-signature, and is always refused by promotion."""

import hashlib
import json
import shutil

import pytest
import yaml

from cxr.config import REPO_ROOT, ExportModelConfig, ImportModelConfig, PromoteConfig, load_platform
from cxr.package import CARD, CHECKSUMS, write_checksums
from cxr.workflows.promotion import EXIT_PROMOTED, EXIT_REJECTED, alias_version
from cxr.workflows.screen import import_model
from jobs import export_model, import_model as import_job, promote
from tests.conftest import unique_models

NAMES = unique_models("gates")
BUNDLE = REPO_ROOT / "models" / "cxr-screen"


@pytest.fixture(scope="module")
def demo_registry(local_stack, sample_manifests, tmp_path_factory):
    """The registry make demo leaves: the shipped screen imported as champion; the real gates,
    on the gate set the sample allows."""
    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    raw["registered_models"] = {**raw["registered_models"], **NAMES}
    raw["promotion"]["n_boot"] = 300
    raw["promotion"]["screen"]["gate_manifest"] = str(sample_manifests / "tasks" / "archives.parquet")
    path = tmp_path_factory.mktemp("platform") / "mlflow.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_PLATFORM_CONFIG", str(path))
        import_model(load_platform(), BUNDLE, "champion")
    return path


@pytest.fixture(autouse=True)
def use_platform(demo_registry, monkeypatch):
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(demo_registry))


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "site.key"
    path.write_bytes(hashlib.sha256(b"a site's secret, for the test").hexdigest().encode())
    return path


def _export(out, key=None) -> None:
    assert export_model.main(ExportModelConfig(model=f"models:/{NAMES['screen']}@champion", out=str(out),
                                               dtype="int8", sign_key=str(key) if key else None)) == 0


def _edit_threshold(bundle, threshold: float) -> None:
    """What a tamperer does: change the card's threshold and recompute the checksums."""
    card_path = bundle / "classifier" / CARD
    card = json.loads(card_path.read_text())
    card["operating_point"]["threshold"] = threshold
    card_path.write_text(json.dumps(card))
    write_checksums(bundle)


def _import(bundle, key=None, require=False) -> int:
    return import_job.main(ImportModelConfig(bundle=str(bundle), verify_key=str(key) if key else None,
                                             require_signature=require))


def _newest_screen() -> str:
    from mlflow import MlflowClient

    return str(max(int(v.version) for v in MlflowClient(load_platform().tracking_uri)
                   .search_model_versions(f"name='{NAMES['screen']}'")))


def test_the_champion_reimported_is_promotable(tmp_path, capsys):
    _export(tmp_path / "bundle")
    assert _import(tmp_path / "bundle") == 0
    version = _newest_screen()
    capsys.readouterr()
    assert promote.main(PromoteConfig(model=NAMES["screen"], version=version)) == EXIT_PROMOTED
    line = capsys.readouterr().out
    assert "all gates hold" in line and "gate set" in line and "archives it never trained on: none here" in line
    assert alias_version(load_platform().tracking_uri, NAMES["screen"], "champion") == version


def test_an_edited_threshold_is_refused(tmp_path, key, capsys):
    _export(tmp_path / "signed", key)
    shutil.copytree(tmp_path / "signed", tmp_path / "edited")
    _edit_threshold(tmp_path / "edited", 0.0001)
    assert (tmp_path / "edited" / CHECKSUMS).read_text() != (tmp_path / "signed" / CHECKSUMS).read_text()

    # Signatures required: the edited bundle, and an unsigned one, are refused at import.
    capsys.readouterr()
    assert _import(tmp_path / "edited", key, require=True) == 2
    assert "edited after signing" in capsys.readouterr().err
    shutil.copytree(tmp_path / "edited", tmp_path / "unsigned")
    (tmp_path / "unsigned" / "signature.json").unlink()
    assert _import(tmp_path / "unsigned", key, require=True) == 2
    assert "not signed" in capsys.readouterr().err
    assert _import(tmp_path / "signed", key, require=True) == 0

    # Without signatures the checksums pass; promotion refuses it whatever the card claims.
    assert _import(tmp_path / "edited") == 0
    edited = _newest_screen()
    champion = alias_version(load_platform().tracking_uri, NAMES["screen"], "champion")
    capsys.readouterr()
    assert promote.main(PromoteConfig(model=NAMES["screen"], version=edited)) == EXIT_REJECTED
    err = capsys.readouterr().err
    assert "not the one chosen on archives it never saw" in err and "specificity 0.000" in err
    assert alias_version(load_platform().tracking_uri, NAMES["screen"], "champion") == champion
