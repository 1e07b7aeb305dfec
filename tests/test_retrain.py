"""``cxr retrain`` end to end on tiny twins on CPU: prepare-data -> train-segmenter -> pretrain
-> finetune -> challenger -> gated promotion; a rerun of the same snapshot (data and recipe)
does nothing. A fine-tuned classifier's threshold was chosen in distribution, never shown to
transfer to an unseen archive, so the screen gates refuse it: exit 3, champion unchanged."""

import dataclasses

import yaml
from mlflow import MlflowClient

from cxr.config import REPO_ROOT, PrepareDataConfig, RetrainConfig, load_platform
from cxr.data.manifest import manifest_digest, read_manifest
from cxr.workflows.promotion import EXIT_REJECTED, alias_version
from cxr.tracking import load_card
from jobs import prepare_data, retrain
from tests.conftest import unique_models

TINY = {"num_workers": 2, "batch_size": 8}


def test_retrain_runs_the_chain_once_per_snapshot(local_stack, ray_local, sample_root, tmp_path, monkeypatch, capsys):
    manifests = tmp_path / "manifests"
    # Freeze the promotion sets on the sample's test splits, under this test's own model names.
    assert prepare_data.main(PrepareDataConfig(data_root=str(sample_root), out=str(manifests), threads=2)) == 0

    def frozen(path):
        rows = read_manifest(str(path))
        return manifest_digest(rows[rows["split"] == "test"])

    raw = yaml.safe_load((REPO_ROOT / "mlflow.yaml").read_text())
    names = unique_models("retrain")
    raw["registered_models"] = names
    task = manifests / "tasks" / "dataset2-4class.parquet"
    raw["promotion"].update(n_boot=100, segmenter={
        "evaluation_manifest": str(manifests / "lungseg.parquet"), "evaluation_split": "test",
        "evaluation_sha256": frozen(manifests / "lungseg.parquet"), "gates": {"dice_mean": 0.0},
        "non_inferiority": {"metric": "dice_mean", "margin": 0.05}}, classifier={
        "evaluation_manifest": str(task), "evaluation_split": "test", "evaluation_sha256": frozen(task),
        "gates": {"accuracy": 0.0}, "non_inferiority": {"metric": "accuracy", "margin": 0.05}})
    raw["promotion"]["screen"].update(gate_manifest=str(manifests / "tasks" / "archives.parquet"),
                                      gates={"specificity": 0.0})
    (tmp_path / "mlflow.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CXR_PLATFORM_CONFIG", str(tmp_path / "mlflow.yaml"))
    configs = {
        "segmenter": dict(TINY, model="unet-tiny", image_size=64, epochs=1, loader_workers=0,
                          storage_path=str(tmp_path / "ray")),
        "pretrain": dict(TINY, model="resnet18-tiny", image_size=64, stage1_epochs=1, load_threads=2,
                         storage_path=str(tmp_path / "ray")),
        "finetune": dict(TINY, model="resnet18-tiny", image_size=64, stage1_epochs=1, stage2_epochs=1,
                         manifest="screen-4class.parquet", load_threads=2, n_boot=50,
                         storage_path=str(tmp_path / "ray")),
    }
    for name, values in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
    cfg = RetrainConfig(data_root=str(sample_root), manifests=str(manifests), train_segmenter=True, pretrain=True,
                        segmenter_config=str(tmp_path / "segmenter.yaml"), pretrain_config=str(tmp_path / "pretrain.yaml"),
                        finetune_config=str(tmp_path / "finetune.yaml"))
    assert retrain.main(cfg) == EXIT_REJECTED
    out = capsys.readouterr().out
    uri = load_platform().tracking_uri
    # Both new models are challengers; the segmenter passed its gate, the classifier's screen not.
    assert alias_version(uri, names["segmenter"], "challenger") == alias_version(uri, names["segmenter"], "champion")
    assert alias_version(uri, names["classifier"], "challenger") == "1"
    assert "never shown to transfer" in out and alias_version(uri, names["screen"], "champion") is None, out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(load_platform().experiments["retrain"])
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and len(run.data.tags["cxr.snapshot"]) == 64
    # Classifier v1 is the screening recipe's: whole images of every archive, archive-balanced.
    card = load_card(uri, f"models:/{names['classifier']}/1")
    assert not card.preprocessing.lung_mask and card.training_data[0].name == "screen-4class"
    assert card.operating_point.temperature > 0
    # The classifier's screen was registered to be judged, with segmenter v1 for the lung-area QC.
    screen = client.get_model_version(names["screen"], "1")
    assert screen.tags["cxr.segmenter"] == f"{names['segmenter']}/1"

    # The same data snapshot again: nothing new is trained or registered.
    assert retrain.main(cfg) == 0
    assert "nothing new" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name='{names['classifier']}'")) == 1
    # A finetune config that does not exist is an error, never the defaults.
    assert retrain.main(dataclasses.replace(cfg, finetune_config=str(tmp_path / "missing.yaml"))) == 1
    assert "no such file" in capsys.readouterr().err


def test_the_snapshot_covers_the_recipe(sample_manifests):
    """Changed training settings are new work, as new data is."""
    from cxr.workflows.retrain import snapshot_digest

    inputs = [sample_manifests / "tasks" / "screen-4class.parquet"]
    base = snapshot_digest(inputs, {"finetune": {"stage1_lr": 0.001}})
    assert base == snapshot_digest(inputs, {"finetune": {"stage1_lr": 0.001}})
    assert base != snapshot_digest(inputs, {"finetune": {"stage1_lr": 0.002}})
    assert base != snapshot_digest([sample_manifests / "lungseg.parquet"], {"finetune": {"stage1_lr": 0.001}})
