"""Training that survives a kill and counts each image once: a pretraining killed with -9 and
run again continues at its next epoch in the same MLflow run and ends, on one CPU worker, with
the metrics of an uninterrupted run; with 2 workers validation counts each image exactly once
and gives 1 worker's figures on the same model."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from cxr.config import REPO_ROOT, PretrainConfig, load_config, load_platform
from cxr.data.manifest import read_manifest

pytestmark = pytest.mark.integration

TINY = dict(model="resnet18-tiny", image_size=64, batch_size=8, stage1_epochs=8, stage2_epochs=0, load_threads=2,
            num_workers=1, seed=3)


def _end_processes_under(ray_tmpdir: str) -> None:
    """Kill the processes of a Ray whose ``RAY_TMPDIR`` is ``ray_tmpdir`` (a killed job's)."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_TMPDIR") == ray_tmpdir:
                p.kill()
        except psutil.Error:
            continue


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(load_platform().tracking_uri).get_metric_history(run_id, key))


def _runs(name: str) -> list:
    c = MlflowClient(load_platform().tracking_uri)
    exp = c.get_experiment_by_name(load_platform().experiments["pretrain"])
    return c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") if exp else []


def test_a_killed_pretraining_resumes_in_its_run(local_stack, ray_local, sample_manifests, tmp_path):
    from jobs import pretrain

    manifest = str(sample_manifests / "tasks" / "source.parquet")
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump({**TINY, "manifest": manifest, "run_name": "killed",
                                      "storage_path": str(tmp_path / "ray")}))
    # The same command in a process of its own (its own local Ray), killed with -9 after epoch 1.
    # Its Ray lives under a folder of its own, so what the kill leaves of it can be found and ended.
    own_ray = tempfile.mkdtemp(prefix="cxr-ray-job-", dir="/tmp")       # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "CXR_RAY_DASHBOARD": "0", "RAY_TMPDIR": str(own_ray)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.cli", "pretrain", "--config", str(config)]
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = _runs("killed")
        if runs and len(_history(runs[0].info.run_id, "val_loss")) >= 2:
            break
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    _end_processes_under(own_ray)           # Ray's actors run in process groups of their own
    shutil.rmtree(own_ray, ignore_errors=True)
    (run,) = _runs("killed")
    done = len(_history(run.info.run_id, "val_loss"))
    assert 2 <= done < TINY["stage1_epochs"], done
    assert MlflowClient(load_platform().tracking_uri).get_run(run.info.run_id).info.status == "RUNNING"

    # Again: the same run continues where the checkpoint left it, and finishes.
    assert pretrain.main(load_config(PretrainConfig, str(config))) == 0
    (again,) = _runs("killed")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["cxr.resumed"] == "1"
    resumed = _history(run.info.run_id, "val_loss")
    assert [step for step, _ in resumed] == list(range(TINY["stage1_epochs"]))     # each epoch once

    # An uninterrupted run of the same settings ends with the same figures, epoch by epoch.
    reference = load_config(PretrainConfig, str(config), {"run_name": "uninterrupted"})
    assert pretrain.main(reference) == 0
    (whole,) = _runs("uninterrupted")
    for key in ("val_loss", "train_loss", "val_accuracy"):
        a, b = _history(whole.info.run_id, key), _history(run.info.run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5, (key, a, b)


def test_two_workers_count_each_image_once(local_stack, ray_local, sample_manifests, tmp_path):
    """The same model (only the head trains, every BatchNorm frozen, at a learning rate too small
    to move it) validated by 1 and by 2 workers."""
    from cxr.workflows.classifier import pretrain

    manifest = str(sample_manifests / "tasks" / "source.parquet")
    rows = read_manifest(manifest)
    splits = rows["split"].value_counts()
    results = {}
    for workers in (1, 2):
        cfg = load_config(PretrainConfig, overrides={**TINY, "stage1_epochs": 1, "manifest": manifest, "num_workers": workers,
                                                     "stage1_lr": 1e-12, "stage1_trainable": "fc",
                                                     "run_name": f"count-{workers}",
                                                     "storage_path": str(tmp_path / "ray")})
        results[workers] = pretrain(cfg, load_platform())["run_id"]
    for workers, run_id in results.items():
        metrics = MlflowClient(load_platform().tracking_uri).get_run(run_id).data.metrics
        assert metrics["n_val"] == splits["val"], (workers, metrics)
        assert metrics["n_train"] == splits["train"], (workers, metrics)
    one, two = (pd.Series(MlflowClient(load_platform().tracking_uri).get_run(results[w]).data.metrics) for w in (1, 2))
    assert one["val_accuracy"] == pytest.approx(two["val_accuracy"], abs=1e-9)
    assert one["val_loss"] == pytest.approx(two["val_loss"], abs=1e-5)
