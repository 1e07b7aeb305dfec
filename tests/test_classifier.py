"""Classification: unit checks of the pieces, then tiny twins end to end through Ray Train (2
CPU workers), the loopback MLflow server and Ray Tune: pretrain -> finetune (lung-masked by a
registered segmenter) -> evaluate, and a 2-trial Optuna study that resumes."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from cxr import tracking
from cxr.config import (EvaluateConfig, FinetuneConfig, PretrainConfig, TrainBenchmarkConfig, TuneJobConfig,
                        load_config, load_platform)
from cxr.data.augment import classifier_augment_batch
from cxr.evaluation import covid_auroc_within
from cxr.metrics import (auroc_interval, bootstrap_metrics, classification_metrics, screening_metrics,
                         threshold_for_specificity)
from cxr.models import build_model, model_names
from cxr.models.classifier import freeze_batchnorm, load_matching, read_state_file, set_trainable
from cxr.train.classifier import class_weights
from cxr.train.classifier_data import task_rows
from jobs import evaluate, finetune, pretrain, tune
from tests.conftest import own_platform


def test_registry_has_classifier_and_twin():
    assert {"resnet50", "resnet18-tiny"} <= set(model_names("classifier"))
    model = build_model("resnet50", num_classes=3, dropout=0.2)
    assert model.fc[0].p == 0.2 and model.fc[1].out_features == 3


def test_set_trainable_freezes_by_module_name_and_lists_choices():
    model = build_model("resnet18-tiny", num_classes=4)
    set_trainable(model, ["layer4", "fc"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    model.train()
    freeze_batchnorm(model)
    assert not model.layer1[0].bn1.training and model.layer4[0].bn1.training
    with pytest.raises(ValueError, match="choices: .*layer3"):
        set_trainable(model, ["layer9"])
    set_trainable(model, ["all"])
    assert all(p.requires_grad for p in model.parameters())


def test_class_weights_follow_the_paper():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert torch.allclose(class_weights(labels, 3), torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert class_weights(np.array([0, 0]), 2)[1] == 0


def test_augmentation_is_per_sample_and_identity_without_range():
    x = torch.rand(4, 1, 32, 32) * 255
    same = classifier_augment_batch(x, degrees=0, scale=(1, 1), jitter=0)
    assert torch.allclose(same, x, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    out = classifier_augment_batch(x[:1].repeat(4, 1, 1, 1), generator=g)
    assert out.shape == (4, 1, 32, 32) and out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out[0], out[1])          # each image draws its own parameters


def test_init_from_a_torchvision_style_file_skips_the_mismatched_head(tmp_path):
    source = build_model("resnet18-tiny", num_classes=3)
    state = {("fc." + k[5:] if k.startswith("fc.1.") else k): v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "imagenet-like.pth")
    target = build_model("resnet18-tiny", num_classes=4)
    loaded = load_matching(target, read_state_file(tmp_path / "imagenet-like.pth"))
    assert "conv1.weight" in loaded and "fc.1.weight" not in loaded
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_metrics_agree_with_sklearn_and_intervals_cover_the_value():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(100), y[:100]] += 1.5                  # half of them right on purpose
    probs /= probs.sum(1, keepdims=True)
    classes = ["covid", "normal", "pneumonia"]
    m = classification_metrics(y, probs, classes)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert m["f1_normal"] == pytest.approx(f1_score(y, probs.argmax(1), average=None)[1])
    ci = bootstrap_metrics(y, probs, classes, n_boot=200)
    for v in ci.values():
        assert v["low"] <= v["value"] <= v["high"]
    assert 0 < ci["accuracy"]["high"] - ci["accuracy"]["low"] < 0.3


def test_screening_threshold_reaches_the_specificity_with_the_most_sensitivity():
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.4
    score = np.where(positive, rng.normal(1, 1, 400), rng.normal(-1, 1, 400))
    t = threshold_for_specificity(positive, score, 0.85)
    called = score >= t
    assert (~called & ~positive).sum() / (~positive).sum() >= 0.85
    # Lowering it far enough to catch one more positive would break the specificity.
    lower = score[(score < t) & positive].max()
    assert (~(score >= lower) & ~positive).sum() / (~positive).sum() < 0.85
    m = screening_metrics(positive, score, t, n_boot=200)
    tn, fp, fn, tp = confusion_matrix(positive, called).ravel()
    assert m["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert m["sensitivity"]["low"] <= m["sensitivity"]["value"] <= m["sensitivity"]["high"]


def test_covid_auroc_within_one_archive_sees_through_an_archive_shortcut():
    """A score that only knows the archive (every COVID image from one, the negatives mostly
    from another) has a high overall AUROC and chance inside the COVID archive."""
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"source": ["covid"] * 60 + ["shenzhen"] * 80, "age_group": "adult",
                         "view": ["AP"] * 4 + ["PA"] * 136})
    positive = np.r_[rng.random(60) < 0.8, np.zeros(80, bool)]
    score = np.where(rows["source"] == "covid", 0.7, 0.2) + rng.normal(0, 0.05, 140)
    assert roc_auc_score(positive, score) > 0.85
    within = covid_auroc_within(rows, positive, score, n_boot=200)
    inside = within["source=covid"]
    assert abs(inside["value"] - 0.5) < 0.2 and inside["low"] <= inside["value"] <= inside["high"]
    assert inside["n_positive"] == positive[:60].sum() and inside["n_negative"] == 60 - positive[:60].sum()
    assert inside == auroc_interval(positive[:60], score[:60], n_boot=200)
    assert inside["value"] == pytest.approx(roc_auc_score(positive[:60], score[:60]))
    # shenzhen has no COVID image and there are 4 adult AP films (under MIN_WITHIN): no entry.
    assert set(within) == {"source=covid", "adult, view=PA"}


def test_task_rows_refuse_labels_outside_the_classes():
    df = pd.DataFrame({"uri": ["a", "b"], "label": ["covid", "viral"], "split": ["train", "val"]})
    with pytest.raises(ValueError, match=r"labels \['viral'\].*not among classes"):
        task_rows(df, ["covid", "normal"])


# --- end to end on tiny twins -----------------------------------------------------------------

TINY = dict(model="resnet18-tiny", image_size=64, batch_size=8, num_workers=2, load_threads=2)


@pytest.fixture(scope="module", autouse=True)
def own_names(tmp_path_factory):
    """This module's jobs register under names of their own (no test reads another's versions)."""
    with own_platform(tmp_path_factory.mktemp("platform"), "cls") as names:
        yield names


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_models):
    return tiny_models["segmenter"]


@pytest.fixture(scope="module")
def pretrained(local_stack, ray_local, sample_manifests, tmp_path_factory):
    cfg = load_config(PretrainConfig, overrides=dict(
        TINY, manifest=str(sample_manifests / "tasks" / "source.parquet"), stage1_epochs=2,
        run_name="tiny-pretrain", storage_path=str(tmp_path_factory.mktemp("ray"))))
    assert pretrain.main(cfg) == 0
    client = MlflowClient(load_platform().tracking_uri)
    exp = client.get_experiment_by_name(load_platform().experiments["pretrain"])
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'tiny-pretrain'")
    return run


def test_pretrain_logs_epochs_and_a_safe_checkpoint(pretrained):
    client = MlflowClient(load_platform().tracking_uri)
    assert pretrained.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(pretrained.info.run_id, "val_loss")] == [0, 1]
    assert {a.path for a in client.list_artifacts(pretrained.info.run_id, "checkpoint")} == {
        "checkpoint/meta.json", "checkpoint/model.safetensors"}
    from cxr.train.checkpoints import load_run_checkpoint

    model, meta = load_run_checkpoint(load_platform().tracking_uri, pretrained.info.run_id)
    assert meta["classes"] == ["normal", "bacterial", "viral"] and model.fc[1].out_features == 3


def test_a_time_limit_stops_training_after_the_epoch_that_passes_it(local_stack, ray_local, sample_manifests,
                                                                     tmp_path):
    """A GPU lease's clock (experiments/gpu_figures.py): 3 epochs asked, no time allowed, one epoch run,
    and its checkpoint kept."""
    from cxr.workflows.classifier import pretrain as run_pretrain

    cfg = load_config(PretrainConfig, overrides=dict(
        TINY, manifest=str(sample_manifests / "tasks" / "source.parquet"), stage1_epochs=3, time_limit_s=0.0,
        run_name="tiny-pretrain-time-limit", storage_path=str(tmp_path)))
    result = run_pretrain(cfg, load_platform())
    assert result["epochs"] == 1 and result["meta"]["epoch"] == 0
    history = MlflowClient(load_platform().tracking_uri).get_metric_history(result["run_id"], "val_loss")
    assert [m.step for m in history] == [0]


@pytest.fixture(scope="module")
def finetuned(pretrained, tiny_segmenter, sample_manifests, tmp_path_factory):
    cfg = load_config(FinetuneConfig, overrides=dict(
        TINY, manifest=str(sample_manifests / "tasks" / "dataset2-4class.parquet"), stage1_epochs=1,
        stage2_epochs=1, pretrain_run=pretrained.info.run_id, segmenter=tiny_segmenter, n_boot=50,
        run_name="tiny-finetune", storage_path=str(tmp_path_factory.mktemp("ray"))))
    assert finetune.main(cfg) == 0
    platform = load_platform()
    (version,) = MlflowClient(platform.tracking_uri).search_model_versions(
        f"name='{platform.registered_models['classifier']}'")
    return version


def test_benchmark_train_times_each_part_of_the_step(ray_local, tmp_path):
    """Runs the parts in a Ray Train worker and records each; the figures belong in RESULTS.md."""
    from jobs import benchmark_train

    cfg = TrainBenchmarkConfig(model="resnet18-tiny", image_size=64, batch_size=8, steps=3, warmup_steps=1,
                               out=str(tmp_path))
    assert benchmark_train.main(cfg) == 0
    rates = json.loads((tmp_path / "benchmark_train.json").read_text())["images_per_s"]
    assert set(rates) == {"step", "step_augment", "loader_augment_step"}
    assert all(v > 0 for v in rates.values())


def test_benchmark_train_refuses_zero_steps(tmp_path, capsys):
    """Zero timed steps would time nothing (and record 0 images/s); refused before Ray starts."""
    from jobs import benchmark_train

    assert benchmark_train.main(TrainBenchmarkConfig(steps=0, out=str(tmp_path))) == 2
    assert "--steps >= 1" in capsys.readouterr().err
    assert not (tmp_path / "benchmark_train.json").exists()


def test_finetune_registers_a_carded_lung_masked_classifier(finetuned, pretrained, tiny_segmenter):
    platform = load_platform()
    client = MlflowClient(platform.tracking_uri)
    run = client.get_run(finetuned.run_id)
    assert run.data.params["init"] == f"pretrain run {pretrained.info.run_id}"
    assert [m.step for m in client.get_metric_history(finetuned.run_id, "stage")] == [0, 1]
    assert [m.value for m in client.get_metric_history(finetuned.run_id, "stage")] == [1, 2]
    assert "test_accuracy_ci_low" in run.data.metrics and "test_f1_covid" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(finetuned.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/gradcam.png", "plots/loss_curves.png"} <= plots
    loaded = tracking.load_registered(platform.tracking_uri,
                                      f"models:/{platform.registered_models['classifier']}/{finetuned.version}")
    card = loaded.card
    assert card.labels == ("covid", "normal", "bacterial", "viral")
    assert card.preprocessing.lung_mask is True and card.preprocessing.segmenter_uri == tiny_segmenter
    assert card.intended_use == "research use, not for diagnosis"
    assert loaded.model.fc[1].out_features == 4
    # The sample's validation split has 5 COVID and 1 other image, no adults: chosen on all of
    # it, after temperature scaling, for every archive; the test report has each archive's rates.
    op = card.operating_point
    assert op.chosen_on == "validation, all images (n=6), every archive" and op.min_specificity == 0.85
    assert op.temperature > 0 and run.data.metrics["test_screening_threshold"] == pytest.approx(op.threshold)
    assert card.metrics["test"]["screening"]["archives"]["kermany"]["n_other"] > 0
    assert "test_screening_archive_kermany_specificity" in run.data.metrics
    # Readable parameters, the manifest as the run's dataset, the card in Markdown.
    assert run.data.params["stage2_trainable"] == "layer3,layer4,fc" and run.data.params["dilation_px"] == "none"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "dataset2-4class" and card.training_data[0].sha256.startswith(dataset.dataset.digest)
    assert finetuned.description.startswith("# resnet18-tiny classifier") and "COVID F1" in finetuned.description
    assert "NaN" not in finetuned.description and finetuned.tags["cxr.lung_mask"] == "true"


def test_ablation_runs_variants_and_writes_the_tables(pretrained, tiny_segmenter, sample_manifests, tmp_path):
    """One variant, one seed of the tiny twin: the job behind docs/RESULTS.md's tables."""
    from cxr.config import AblationConfig
    from jobs import ablation

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(dict(TINY, stage1_epochs=1, stage2_epochs=1, segmenter=tiny_segmenter, n_boot=20,
                                        register=False, storage_path=str(tmp_path / "ray"))))
    cfg = AblationConfig(finetune_config=str(base), pretrain_run=pretrained.info.run_id,
                         manifests=str(sample_manifests), variants=("deconfounded-4class",), seeds=(0,),
                         out=str(tmp_path / "ablation"))
    assert ablation.main(cfg) == 0
    (result,) = json.loads((tmp_path / "ablation" / "results.json").read_text())
    assert (result["variant"], result["seed"]) == ("deconfounded-4class", 0)
    assert result["report"]["screening"]["min_specificity"] == 0.85
    table_md = (tmp_path / "ablation" / "table.md").read_text()
    assert "| deconfounded-4class | 1 |" in table_md and "adult sens. at val threshold" in table_md


def test_evaluate_writes_metrics_with_intervals_and_plots(finetuned, sample_manifests, tmp_path):
    platform = load_platform()
    cfg = EvaluateConfig(manifest=str(sample_manifests / "tasks" / "deconfounded-4class.parquet"),
                         classifier=f"models:/{platform.registered_models['classifier']}/{finetuned.version}",
                         out=str(tmp_path), n_boot=50, cam_examples=2, load_threads=2)
    assert evaluate.main(cfg) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    test_rows = pd.read_parquet(sample_manifests / "tasks" / "deconfounded-4class.parquet").query("split == 'test'")
    assert report["n"] == len(test_rows)
    assert np.array(report["confusion_matrix"]).sum() == len(test_rows)
    assert set(report["metrics"]["accuracy"]) == {"value", "low", "high"}
    assert report["adult"]["n"] == int((test_rows["age_group"] == "adult").sum())
    assert report["screening"]["chosen_on"].startswith("the model card (validation")   # the card's threshold
    assert report["screening"]["adult"]["n"] == report["adult"]["n"]
    for name in ("confusion_matrix.png", "roc.png", "gradcam.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == len(test_rows)


def test_tune_runs_nested_trials_writes_a_finetune_yaml_and_resumes(pretrained, tiny_segmenter, sample_manifests,
                                                                    tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(dict(
        TINY, manifest=str(sample_manifests / "tasks" / "dataset2-3class.parquet"),
        classes=["covid", "normal", "pneumonia"], stage1_epochs=1, stage2_epochs=1, segmenter=tiny_segmenter,
        pretrain_run=pretrained.info.run_id)))
    cfg = TuneJobConfig(finetune_config=str(base), num_samples=2, study_name="tiny-study", grace_epochs=1,
                        study_storage=f"sqlite:///{tmp_path}/optuna.db", best_config_out=str(tmp_path / "best.yaml"),
                        run_name="tiny-study", storage_path=str(tmp_path / "ray"))
    assert tune.main(cfg) == 0
    best = load_config(FinetuneConfig, str(tmp_path / "best.yaml"))   # finetune accepts it
    assert best.classes == ("covid", "normal", "pneumonia") and 1e-4 <= best.stage1_lr <= 1e-2
    client = MlflowClient(load_platform().tracking_uri)
    exp = client.get_experiment_by_name(load_platform().experiments["tune"])
    (study,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'tiny-study'")
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{study.info.run_id}'")
    assert len(trials) == 2 and {t.info.status for t in trials} <= {"FINISHED", "KILLED"}
    assert all(t.data.tags["cxr.stopped_by"] == "scheduler" for t in trials if t.info.status == "KILLED")
    assert all(t.data.metrics["epoch"] >= 0 for t in trials)          # each logged its epochs
    assert best.tuned_by.startswith("study tiny-study (key ") and " trial " in best.tuned_by
    # A session killed mid-trial leaves its Optuna trial and its MLflow run RUNNING; simulated here.
    import optuna
    storage = f"sqlite:///{tmp_path}/optuna.db"
    killed = optuna.load_study(study_name="tiny-study", storage=storage).ask()
    killed_run = client.create_run(exp.experiment_id, run_name="killed-trial",
                                   tags={"cxr.study": "tiny-study", "cxr.job": "tune-trial"}).info.run_id
    # The study persisted: asking for 3 samples again marks the killed trial failed and runs the
    # one missing trial, at parameters no trial had.
    capsys.readouterr()
    assert tune.main(dataclasses.replace(cfg, num_samples=3)) == 0
    assert "2 trials finished before, 1 interrupted" in capsys.readouterr().out
    study = optuna.load_study(study_name="tiny-study", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and study.trials[killed.number].state.name == "FAIL"
    done = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(done) == 3 and len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)
    assert client.get_run(killed_run).info.status == "FAILED"
    assert len(study.user_attrs["cxr_sampler_seeds"]) == 2 and len(set(study.user_attrs["cxr_sampler_seeds"])) == 2
    # Another base (other data or settings) under the same study name: refused, no trial shared.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), "stage1_epochs": 2}))
    assert tune.main(dataclasses.replace(cfg, finetune_config=str(other), num_samples=4)) == 2
    assert "was run on another base config or data" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="tiny-study", storage=storage).trials) == 4


def test_crossval_trains_a_fold_without_its_archive_and_reports_on_it(pretrained, sample_manifests, tmp_path):
    """Two folds of the screening recipe (archive-balanced, photometric augmentation) with the
    tiny twin: holding out Montgomery, then holding out nothing, registered with the
    cross-archive figures in its card. Resumable: a rerun trains nothing."""
    from cxr.config import CrossvalConfig
    from jobs import crossval

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(dict(TINY, stage1_epochs=1, stage2_epochs=1, storage_path=str(tmp_path / "ray"))))
    cfg = CrossvalConfig(finetune_config=str(base), pretrain_run=pretrained.info.run_id,
                         manifests=str(sample_manifests), recipes=("screen",),
                         folds=("montgomery", "(none held out)"), min_archive_images=5, n_boot=20, register=True,
                         out=str(tmp_path / "cv"))
    assert crossval.main(cfg) == 0
    held = json.loads((tmp_path / "cv" / "screen" / "montgomery.json").read_text())
    train = pd.read_parquet(tmp_path / "cv" / "screen" / "montgomery-train.parquet")
    assert "montgomery" not in set(train["archive"]) and held["n_train"] == int((train["split"] == "train").sum())
    assert set(held["archives"]) == {"montgomery"} and "specificity" in held["archives"]["montgomery"]
    assert held["temperature"] > 0 and 0 <= held["threshold"] <= 1
    predictions = pd.read_parquet(tmp_path / "cv" / "screen" / "montgomery.parquet")
    montgomery = pd.read_parquet(sample_manifests / "tasks" / "archives.parquet").query("archive == 'montgomery'")
    assert sorted(predictions["uri"]) == sorted(montgomery["uri"]) and predictions["p_covid"].between(0, 1).all()
    run = MlflowClient(load_platform().tracking_uri).get_run(held["run_id"])
    assert run.data.params["archive_balanced"] == "True" and run.data.params["photometric"] == "True"
    everything = json.loads((tmp_path / "cv" / "screen" / "all.json").read_text())
    assert everything["in_distribution_test"]["n_covid"] > 0          # the trained archives' test split
    platform = load_platform()
    registered = tracking.load_registered(platform.tracking_uri,
                                          f"models:/{platform.registered_models['classifier']}/{everything['version']}")
    cross = registered.card.metrics["cross_archive"]
    assert cross["recipe"] == "screen" and "montgomery" in [r["archive"] for r in cross["held_out"]]
    assert registered.card.operating_point.temperature == pytest.approx(everything["temperature"])
    assert not registered.card.preprocessing.lung_mask
    description = MlflowClient(platform.tracking_uri).get_model_version(
        platform.registered_models["classifier"], everything["version"]).description
    assert "## Cross-archive figures" in description and "| montgomery |" in description
    table_md = (tmp_path / "cv" / "table.md").read_text()
    assert "| screen | montgomery | yes |" in table_md
    mtime = (tmp_path / "cv" / "screen" / "montgomery.json").stat().st_mtime
    assert crossval.main(cfg) == 0 and (tmp_path / "cv" / "screen" / "montgomery.json").stat().st_mtime == mtime
