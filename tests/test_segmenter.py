"""Segmenter end to end on tiny twins: Ray Train on 2 CPU workers, MLflow logging and
registration on the loopback server, load back by alias with the same output."""

import pickle

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cxr import tracking
from cxr.config import SegmenterTrainConfig, load_platform
from cxr.models import build_model, model_names
from cxr.segmentation import predict_probs
from cxr.train.checkpoints import load_checkpoint, save_checkpoint
from jobs import train_segmenter
from tests.conftest import own_platform


def test_registry_lists_choices_on_unknown_name():
    assert {"unet-resnet34", "unet-tiny"} <= set(model_names("segmenter"))
    with pytest.raises(ValueError, match="choices: .*unet-resnet34"):
        build_model("unet-resnet999")


def test_checkpoint_roundtrip_is_exact(tmp_path):
    model = build_model("unet-tiny").eval()
    save_checkpoint(model, tmp_path, {"model": "unet-tiny"})
    again, meta = load_checkpoint(tmp_path)
    x = torch.randn(2, 1, 64, 64)
    assert meta["model"] == "unet-tiny"
    assert torch.equal(model(x), again(x))


def test_checkpoint_loads_onto_the_device_asked_for(tmp_path):
    # The GPU scorer once got CPU weights here: the state was loaded onto the device but copied
    # into a CPU module. "meta" stands in for a GPU on a machine without one.
    save_checkpoint(build_model("unet-tiny"), tmp_path, {"model": "unet-tiny"})
    again, _ = load_checkpoint(tmp_path, "meta")
    assert {p.device.type for p in again.parameters()} == {"meta"}


@pytest.fixture(scope="module")
def trained(local_stack, ray_local, sample_manifests, tmp_path_factory):
    """The job, under registered-model names of its own; returns (config, name, its one version)."""
    cfg = SegmenterTrainConfig(manifest=str(sample_manifests / "lungseg.parquet"), model="unet-tiny", image_size=64,
                               epochs=2, batch_size=4, num_workers=2, loader_workers=0, run_name="tiny-test",
                               storage_path=str(tmp_path_factory.mktemp("ray")))
    with own_platform(tmp_path_factory.mktemp("platform"), "seg") as names:
        assert train_segmenter.main(cfg) == 0
    (version,) = MlflowClient(load_platform().tracking_uri).search_model_versions(f"name='{names['segmenter']}'")
    return cfg, names["segmenter"], version


def test_job_logs_run_and_registers_a_version(trained):
    _, name, latest = trained
    client = MlflowClient(load_platform().tracking_uri)
    run = client.get_run(latest.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(latest.run_id, "val_dice")
    assert [m.step for m in history] == [0, 1]                       # one point per epoch, from rank 0
    assert "test_dice_mean_all" in run.data.metrics and "test_dice_mean_montgomery" in run.data.metrics
    assert run.data.params["model"] == "unet-tiny" and len(run.data.params["manifest_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(latest.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/test_overlays.png"} <= artifacts
    assert latest.tags["cxr.intended_use"] == "research use, not for diagnosis"
    assert latest.tags["cxr.task"] == "segmenter" and latest.tags["cxr.input_size"] == "64"
    # The run page lists its training manifest as a dataset, with the manifest's digest.
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "lungseg" and run.data.params["manifest_sha256"].startswith(dataset.dataset.digest)
    # The version's description is a Markdown card, not a JSON dump.
    assert latest.description.startswith("# unet-tiny segmenter") and "## Test Dice" in latest.description
    card = tracking.load_card(load_platform().tracking_uri, f"models:/{name}/{latest.version}")
    assert card.training_data[0].sha256 == run.data.params["manifest_sha256"]
    assert card.metrics["test_dice"]["all"]["n"] > 0


def test_registered_model_loads_by_alias_with_same_output(trained, tmp_path):
    _, name, latest = trained
    platform = load_platform()
    tracking.set_alias(platform.tracking_uri, name, "challenger", latest.version)
    by_alias = tracking.load_registered(platform.tracking_uri, f"models:/{name}@challenger")
    by_version = tracking.load_registered(platform.tracking_uri, f"models:/{name}/{latest.version}")
    assert by_alias.version == latest.version and by_alias.card.architecture == "unet-tiny"
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 1, 64, 64), dtype=np.uint8))
    assert torch.equal(predict_probs(by_alias.model, images), predict_probs(by_version.model, images))
    # Standard MLflow loading works too (python_function through cxr.pyfunc): logits out.
    import mlflow.pyfunc

    from cxr.preprocess import segmenter_input

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    logits = pyfunc.predict(segmenter_input(images).numpy())
    assert np.allclose(torch.sigmoid(torch.from_numpy(logits)), predict_probs(by_version.model, images), atol=1e-5)


def test_planted_pickle_is_refused(trained, tmp_path):
    """A version whose artifacts hold a pickle is never loaded (no torch.load of untrusted bytes)."""
    _, name, latest = trained
    platform = load_platform()
    client = MlflowClient(platform.tracking_uri)
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    client.log_artifact(latest.run_id, str(evil), "model")
    with pytest.raises(ValueError, match=r"unexpected files \['model.pt'\]"):
        tracking.load_registered(platform.tracking_uri, f"models:/{name}/{latest.version}")
    import mlflow.pyfunc

    with pytest.raises(ValueError, match=r"unexpected files \['model.pt'\]"):
        mlflow.pyfunc.load_model(f"models:/{name}/{latest.version}")
    assert not marker.exists()


class _Exploit:
    """Unpickling this runs a shell command: what a malicious artifact would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def test_dice_on_an_archive_it_never_trained_on(tiny_models, full_data_root, tmp_path, capsys):
    """experiments.segmenter_external: JSRT films and their SCR masks, at the card's size, one line per
    archive and the JSON (a tiny untrained segmenter: the figures are not the point here)."""
    import json

    from cxr.data.manifest import jsrt_manifest
    from experiments import segmenter_external

    jsrt = jsrt_manifest(full_data_root)
    assert len(jsrt) == 247 and jsrt["mask_uri"].notna().all() and set(jsrt["source"]) == {"jsrt"}
    out = tmp_path / "jsrt.json"
    assert segmenter_external.main(["--model", tiny_models["segmenter"], "--data", str(full_data_root),
                                    "--limit", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["image_size"] == 64 and result["dice"]["jsrt"]["n"] == 4
    assert 0 <= result["dice"]["jsrt"]["mean_ci_low"] <= result["dice"]["jsrt"]["mean"] <= 1
    assert "jsrt" in capsys.readouterr().out
    assert segmenter_external.main(["--model", "models:/no-such-segmenter/1", "--data", str(full_data_root),
                                    "--limit", "1", "--out", str(out)]) == 1
