"""Shared fixtures: the real local stack (MLflow + S3 on loopback) and the real sample data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr.config import REPO_ROOT, SAMPLE_DATA
from cxr.data.storage import StorageConfig
from infra.local.stack import LocalStack

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as jobs/cli.py does
# Every Ray this suite starts (its own, and those of the jobs it runs in subprocesses) keeps its
# files under a folder of this run, which its processes inherit in their environment: so the
# end-of-suite check below finds this run's Ray processes, and no other session's.
OWN_RAY_TMPDIR = "RAY_TMPDIR" not in os.environ
RAY_TMPDIR = os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp"))
SHARED_DATA = Path(os.environ.get("CXR_DATA") or REPO_ROOT / ".." / "shared" / "data").resolve()


INTEGRATION_FIXTURES = {"local_stack", "ray_local"}
# What a Ray process's command line holds: its workers and actors, and a local cluster's services.
RAY_PROCESSES = ("ray::", "/ray/core/src/ray/raylet/raylet", "/ray/core/src/ray/gcs/gcs_server",
                 "ray/dashboard/dashboard.py", "ray/_private/log_monitor.py", "ray/autoscaler/_private/monitor.py",
                 "ray/_private/workers/default_worker.py", "ray/dashboard/agent.py")


def ray_processes() -> dict[int, str]:
    """This run's Ray processes (their environment names this run's ``RAY_TMPDIR``): {pid: command line}."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if any(k in line for k in RAY_PROCESSES) and p.environ().get("RAY_TMPDIR") == RAY_TMPDIR:
                found[p.info["pid"]] = line[:160]
        except (psutil.Error, TypeError):
            continue
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[RAY_BEFORE] = set(ray_processes())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No Ray process this suite started outlives it: after the session's own shutdown has had
    time, any left is killed and named in the summary. (The kill is the guarantee; the suite does
    not fail for it, as one leak seen once came from a job a test kills on purpose.)"""
    import time

    import psutil

    before = session.config.stash.get(RAY_BEFORE, set())
    if os.environ.get("RAY_ADDRESS"):       # tests joined a cluster of someone else's: not ours to check
        return
    deadline = time.monotonic() + 60
    while (left := {pid: line for pid, line in ray_processes().items() if pid not in before}) and \
            time.monotonic() < deadline:
        time.sleep(2)
    if OWN_RAY_TMPDIR:
        import shutil

        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)
    if not left:
        return
    for pid in left:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"{len(left)} Ray processes outlived the tests (killed now): "
                            + "; ".join(f"{pid} {line}" for pid, line in list(left.items())[:5]), red=True)


RAY_BEFORE = pytest.StashKey[set]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that uses the loopback servers or Ray, directly or
    through another fixture: the mark follows what a test really touches, so it cannot drift.
    The fast tier is ``pytest -m "not integration"``."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def full_data_root() -> Path:
    """The curated data; tests that need all of it skip, saying why, where it is absent."""
    if not (SHARED_DATA / "kermany" / "labels.csv").exists():
        pytest.skip(f"curated data not found at {SHARED_DATA} (set CXR_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow server and a real S3 server on free loopback ports, for the whole session."""
    stack = LocalStack(tmp_path_factory.mktemp("stack")).start()
    with stack.exported():
        yield stack
    stack.stop()


@pytest.fixture(scope="session")
def storage(local_stack: LocalStack) -> StorageConfig:
    return StorageConfig(s3_endpoint=local_stack.s3_endpoint, max_attempts=3)


@pytest.fixture(scope="session")
def sample_bucket(local_stack: LocalStack, sample_root: Path) -> str:
    """The shipped sample, uploaded to s3://cxr-sample/data/ on the loopback server."""
    local_stack.upload_folder(sample_root, "cxr-sample", "data")
    return "s3://cxr-sample/data"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray. num_cpus=4 over-subscribes the 2 cores logically, so a 2-worker
    TorchTrainer and Ray Data tasks in one session never wait on each other. The dashboard is on
    for the state API that Ray Train's placement-group cleaner needs (see jobs/runtime.py). It
    listens on 127.0.0.1 only, as init_ray's local Ray does."""
    import ray

    from jobs.runtime import loopback_node

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with loopback_node():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_manifests(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifests of the shipped sample (real images), built once per session."""
    from cxr.config import PrepareDataConfig
    from jobs import prepare_data

    out = tmp_path_factory.mktemp("manifests")
    assert prepare_data.main(PrepareDataConfig(data_root=str(sample_root), out=str(out))) == 0
    return out


@pytest.fixture(scope="session")
def tiny_models(local_stack) -> dict[str, str]:
    """An untrained tiny segmenter, a classifier lung-masked by it and one trained on whole
    images, registered under names of their own: {"segmenter", "classifier",
    "classifier_nomask": models:/NAME/VERSION}. The unmasked one's probabilities are calibrated
    (temperature 2), so every path that reports probabilities must apply its card's temperature."""
    from cxr.config import load_platform
    from tests.models import register_classifier, register_segmenter, unique

    uri = load_platform().tracking_uri
    segmenter = register_segmenter(uri, unique("tiny-segmenter"))
    return {"segmenter": segmenter,
            "classifier": register_classifier(uri, unique("tiny-classifier"), segmenter),
            "classifier_nomask": register_classifier(uri, unique("tiny-classifier-nomask"), None, seed=1,
                                                     temperature=2.0)}


def platform_file(folder: Path, **changes) -> Path:
    """mlflow.yaml with ``changes`` applied at the top level (e.g. registered_models=...), for
    jobs that read the platform from $CXR_PLATFORM_CONFIG."""
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = Path(folder) / "mlflow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def own_platform(folder: Path, tag: str) -> Iterator[dict[str, str]]:
    """$CXR_PLATFORM_CONFIG pointing at an mlflow.yaml with registered-model names of their own
    (``unique_models(tag)``), for jobs that read the platform; yields the names."""
    names = unique_models(tag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_PLATFORM_CONFIG", str(platform_file(folder, registered_models=names)))
        yield names


def unique_models(tag: str) -> dict[str, str]:
    """Registered-model names of one test: {"segmenter", "classifier", "screen"}."""
    from tests.models import unique

    return {kind: unique(f"{tag}-{kind}") for kind in ("segmenter", "classifier", "screen")}
