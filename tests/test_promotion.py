"""Promotion against the loopback MLflow server. The unit is the screen: promoting a classifier
version promotes its screen, and champion, previous-champion, the classifier's mirror and the
audit move in one transaction (every registry write failed in turn through a proxy leaves them
as they were); rollback walks back through recorded states; the lock expires and can be
removed; a worse candidate is rejected with exit 3 and one line.

Rigged tiny classifiers (a head that always answers one label) make screens of known quality;
the gates here are loose enough for an always-COVID screen to pass, so the transaction is what
is tested. tests/test_promotion_gates.py judges the shipped screen on the real gates."""

import json
import time

import pytest
import yaml
from mlflow import MlflowClient

from cxr import tracking
from cxr.config import REPO_ROOT, PromoteConfig, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.workflows.promotion import (EXIT_FAILED, EXIT_PROMOTED, EXIT_REJECTED, PromotionLock, alias_version, history,
                           lock_holder, lock_name)
from jobs import promote
from tests.conftest import unique_models
from tests.flaky_proxy import FlakyProxy
from tests.models import register_classifier, register_segmenter, transfer_claim

NAMES = unique_models("promo")
SCREEN, CLASSIFIER = NAMES["screen"], NAMES["classifier"]


@pytest.fixture(scope="module")
def platform_file(local_stack, sample_manifests, tmp_path_factory):
    """mlflow.yaml for these tests: its own model names, the sample's gate set, loose gates."""
    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    raw["registered_models"] = {**raw["registered_models"], **NAMES}
    raw["promotion"].update(n_boot=200, lock_ttl_s=600)
    raw["promotion"]["screen"].update(
        gate_manifest=str(sample_manifests / "tasks" / "archives.parquet"),
        gates={"sensitivity": 0.5, "specificity": 0.0, "screened": 0.5},
        cross_archive={"specificity": 0.5, "sensitivity": 0.5})
    path = tmp_path_factory.mktemp("platform") / "mlflow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def use_platform(platform_file, monkeypatch):
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(platform_file))


def _rigged(always: str) -> str:
    """A registered classifier that always answers ``always``, with the card of a threshold
    chosen out of archive; returns its version."""
    uri = register_classifier(load_platform().tracking_uri, CLASSIFIER, None, always=always, threshold=0.25,
                              metrics=transfer_claim(0.25))
    return uri.rsplit("/", 1)[1]


def _screen(classifier_version: str) -> str:
    from cxr.workflows.screen import screen_of_classifier

    return screen_of_classifier(load_platform(), classifier_version)


def _state() -> tuple:
    uri = load_platform().tracking_uri
    return (alias_version(uri, SCREEN, "champion"), alias_version(uri, SCREEN, "previous-champion"),
            alias_version(uri, CLASSIFIER, "champion"), alias_version(uri, CLASSIFIER, "previous-champion"))


def _promote(capsys, **kwargs) -> tuple[int, str]:
    """(exit code, what cxr promote said: its one line on stderr, or the last on stdout)."""
    capsys.readouterr()
    code = promote.main(PromoteConfig(**{"model": SCREEN, **kwargs}))
    captured = capsys.readouterr()
    return code, captured.err.strip() if code else captured.out.strip().splitlines()[-1]


def test_promotion_lifecycle_and_rollback(capsys, tmp_path):
    uri = load_platform().tracking_uri
    client = MlflowClient(uri)
    a, b, c, worse = _rigged("covid"), _rigged("covid"), _rigged("covid"), _rigged("normal")

    # A classifier version is promoted as its screen; the classifier's champion mirrors it.
    code, line = _promote(capsys, model=CLASSIFIER, version=a, reason="first", user="alice")
    assert code == EXIT_PROMOTED, line
    sa = _screen(a)
    assert _state() == (sa, None, a, None)
    assert "no champion yet" in line and "gate set" in line

    sb = _screen(b)
    code, line = _promote(capsys, version=sb, user="bob")
    assert code == EXIT_PROMOTED, line
    assert _state() == (sb, sa, b, a)
    tags = client.get_model_version(SCREEN, sb).tags
    assert tags["promoted_by"] == "bob" and "promotion_run_id" in tags
    audit = client.download_artifacts(tags["promotion_run_id"], "audit.json", str(tmp_path))
    assert json.load(open(audit))["decision"]["gates"]

    # Worse (never flags COVID): rejected with exit 3, one line, nothing changed.
    sw = _screen(worse)
    code, line = _promote(capsys, version=sw)
    assert code == EXIT_REJECTED and "\n" not in line
    assert f"v{sw} rejected, nothing changed" in line and "sensitivity 0.000" in line
    assert _state() == (sb, sa, b, a)
    assert "promoted_at" not in client.get_model_version(SCREEN, sw).tags

    sc = _screen(c)
    assert _promote(capsys, version=sc)[0] == EXIT_PROMOTED
    assert _state() == (sc, sb, c, b)

    # Rollback restores the recorded states, walking back; it never toggles, never registers.
    screens = len(client.search_model_versions(f"name='{SCREEN}'"))
    code, line = _promote(capsys, rollback=True, reason="incident 42")
    assert code == EXIT_PROMOTED, line
    assert _state() == (sb, sa, b, a)
    code, line = _promote(capsys, rollback=True)
    assert code == EXIT_PROMOTED, line
    assert _state() == (sa, None, a, None)
    code, line = _promote(capsys, rollback=True)
    assert code == EXIT_FAILED and "nothing to roll back to" in line
    assert _state() == (sa, None, a, None)
    assert len(client.search_model_versions(f"name='{SCREEN}'")) == screens
    assert [r["action"] for r in history(uri, "cxr-promotion", SCREEN)][-2:] == ["rollback", "rollback"]

    # A promotion killed inside its transaction (aliases moved, audit run still pending) is undone
    # by the next promotion, under the lock.
    interrupted = {"time": "t", "user": "killed", "action": "promote", "model": SCREEN, "reason": "",
                   "before": {"champion": sa, "previous_champion": None},
                   "after": {"champion": sb, "previous_champion": sa}}
    run_id = tracking.start_run(uri, "cxr-promotion", "promote-killed", tags={
        "cxr.model": SCREEN, "cxr.action": "promote", "cxr.outcome": "pending", "cxr.audit": json.dumps(interrupted)})
    for alias, version in (("previous-champion", sa), ("champion", sb)):
        client.set_registered_model_alias(SCREEN, alias, version)
    client.set_registered_model_alias(CLASSIFIER, "champion", b)
    code, line = _promote(capsys, version=sa)
    assert code == EXIT_PROMOTED and f"undid the interrupted {run_id}" in line and line.endswith("nothing to do")
    assert _state() == (sa, None, a, None)
    assert client.get_run(run_id).data.tags["cxr.outcome"] == "aborted"

    # A version that does not exist, and the champion itself: one line each.
    code, line = _promote(capsys, version="999")
    assert code == EXIT_FAILED and "has no version 999" in line
    assert _promote(capsys, version=sa)[1].endswith("nothing to do")


def test_lock_is_refused_expires_and_can_be_removed(capsys):
    uri = load_platform().tracking_uri
    if not alias_version(uri, SCREEN, "champion"):
        assert _promote(capsys, version=_screen(_rigged("covid")))[0] == EXIT_PROMOTED
    candidate = _screen(_rigged("covid"))
    before = _state()

    with PromotionLock(uri, SCREEN, ttl_s=600, owner="carol"):
        code, line = _promote(capsys, version=candidate)
        assert code == EXIT_FAILED and "another promotion" in line and "carol" in line
        assert _state() == before
    assert lock_holder(uri, SCREEN) is None                     # released on exit

    # A crashed holder: its heartbeat stopped longer ago than the ttl, so it is broken.
    MlflowClient(uri).create_registered_model(lock_name(SCREEN), description=json.dumps(
        {"owner": "crashed", "heartbeat": time.time() - 601}))
    code, line = _promote(capsys, version=candidate)
    assert code == EXIT_PROMOTED, line
    assert lock_holder(uri, SCREEN) is None

    # One that is not stale yet: --unlock removes it, with an audit record.
    MlflowClient(uri).create_registered_model(lock_name(SCREEN), description=json.dumps(
        {"owner": "dave", "heartbeat": time.time()}))
    code, line = _promote(capsys, unlock=True, reason="dave's pod was evicted")
    assert code == EXIT_PROMOTED and "dave" in line
    assert lock_holder(uri, SCREEN) is None
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cxr-promotion").experiment_id],
                                         f"tags.`cxr.model` = '{SCREEN}' and tags.`cxr.action` = 'unlock'")
    assert runs and "dave" in runs[0].data.tags["cxr.audit"]


def test_lock_heartbeat_keeps_a_live_promotion_and_expires_a_dead_one():
    uri = load_platform().tracking_uri
    with PromotionLock(uri, SCREEN, ttl_s=1.5, owner="slow"):
        first = lock_holder(uri, SCREEN)["heartbeat"]
        time.sleep(2.0)                                          # longer than the ttl: still held, beating
        assert lock_holder(uri, SCREEN)["heartbeat"] > first
        with pytest.raises(Exception, match="another promotion"):
            PromotionLock(uri, SCREEN, ttl_s=1.5, owner="other").__enter__()


def test_each_failing_registry_write_leaves_the_registry_as_it_was(capsys, monkeypatch, local_stack):
    """Promote through a proxy that fails the Nth registry write, for every N: exit 1 and one
    line, and champion, previous-champion, the mirror and the committed audit trail unchanged."""
    uri = load_platform().tracking_uri
    if not alias_version(uri, SCREEN, "champion"):
        assert _promote(capsys, version=_screen(_rigged("covid")))[0] == EXIT_PROMOTED
    candidate = _screen(_rigged("covid"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # a failed call fails, not retried away
    with FlakyProxy(uri, fail_every=10**9) as proxy:             # count the writes of a good promotion
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.endpoint)
        before, trail = _state(), len(history(uri, "cxr-promotion", SCREEN))
        assert _promote(capsys, version=candidate)[0] == EXIT_PROMOTED
        writes = len(proxy.writes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _promote(capsys, rollback=True)[0] == EXIT_PROMOTED
    assert _state() == before and writes >= 8
    for n in range(1, writes + 1):
        trail = len(history(uri, "cxr-promotion", SCREEN))
        with FlakyProxy(uri, fail_every=10**9, fail_write=n) as proxy:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.endpoint)
            code, line = _promote(capsys, version=candidate)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        failed = proxy.writes[n - 1]
        if n == writes:             # the lock's release: retried, the promotion stands
            assert code == EXIT_PROMOTED, (failed, line)
            assert _promote(capsys, rollback=True)[0] == EXIT_PROMOTED
        else:
            assert code == EXIT_FAILED, (n, failed, line)
            assert "\n" not in line, (failed, line)
            assert _state() == before, (n, failed, line)
            assert len(history(uri, "cxr-promotion", SCREEN)) == trail, (failed, line)
        assert lock_holder(uri, SCREEN) is None, (failed, line)
        exp = MlflowClient(uri).get_experiment_by_name("cxr-promotion").experiment_id
        assert not MlflowClient(uri).search_runs([exp], f"tags.`cxr.model` = '{SCREEN}' and "
                                                        "tags.`cxr.outcome` = 'pending'"), failed


def test_frozen_segmenter_set_is_enforced(sample_manifests, platform_file, tmp_path, monkeypatch, capsys):
    """A segmenter is still judged on the frozen lungseg set of mlflow.yaml; a changed set refuses."""
    raw = yaml.safe_load(platform_file.read_text())
    manifest = sample_manifests / "lungseg.parquet"
    rows = read_manifest(str(manifest))
    raw["promotion"]["segmenter"].update(evaluation_manifest=str(manifest), evaluation_split="test",
                                         evaluation_sha256="0" * 64)
    changed = tmp_path / "mlflow.yaml"
    changed.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(changed))
    version = register_segmenter(load_platform().tracking_uri, NAMES["segmenter"]).rsplit("/", 1)[1]
    code = promote.main(PromoteConfig(model=NAMES["segmenter"], version=version))
    assert code == EXIT_FAILED and "frozen evaluation set changed" in capsys.readouterr().err
    assert manifest_digest(rows[rows["split"] == "test"]) != "0" * 64
    assert alias_version(load_platform().tracking_uri, NAMES["segmenter"], "champion") is None
    assert tracking.model_exists(load_platform().tracking_uri, f"models:/{NAMES['segmenter']}/{version}")
