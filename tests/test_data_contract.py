"""What a training command refuses to train on, in one line: a patient or an image in two
splits, a split or a label it does not know, more unreadable images than the bound; and what
it drops, counted."""

import pandas as pd
import pytest

from cxr.config import PretrainConfig, load_config
from cxr.train.classifier_data import task_rows
from cxr.train.contract import MAX_UNREADABLE_SHARE, DataContractError, check_manifest, check_unreadable


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({"uri": [f"{i}.jpg" for i in range(6)], "sha256": [f"s{i}" for i in range(6)],
                         "patient_id": ["a", "a", "b", "c", "d", None], "label": ["normal"] * 5 + [None],
                         "split": ["train", "train", "val", "test", "test", None]})


def test_a_clean_manifest_is_counted():
    counts = check_manifest(_manifest(), "m")
    assert (counts.rows, counts.without_split, counts.without_label) == (6, 1, 1)


@pytest.mark.parametrize("change, message", [
    ({"patient_id": ["a", "a", "a", "c", "d", None]}, "1 patient(s) in more than one split"),
    ({"sha256": ["s0", "s1", "s0", "s3", "s4", "s5"]}, "1 image(s) in more than one split"),
    ({"split": ["train", "valid", "val", "test", "test", None]}, "1 rows have split(s) ['valid']"),
])
def test_leaks_and_unknown_splits_are_refused(change, message):
    with pytest.raises(DataContractError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_manifest(_manifest().assign(**change), "m")


def test_unknown_labels_and_too_many_unreadable_images_are_refused():
    with pytest.raises(DataContractError, match=r"labels \['pneumothorax'\]"):
        task_rows(_manifest().assign(label=["normal", "pneumothorax", "normal", "normal", "normal", None]),
                  ["normal", "covid"])
    counts = check_manifest(_manifest(), "m")
    check_unreadable(counts, [], 100, "m")
    check_unreadable(counts, [("x.jpg", "not an image")] * int(MAX_UNREADABLE_SHARE * 100), 100, "m")
    assert counts.unreadable == 2 and counts.unreadable_examples[0] == "x.jpg: not an image"
    with pytest.raises(DataContractError, match="3 of 100 images cannot be read"):
        check_unreadable(counts, [("x.jpg", "not an image")] * 3, 100, "m")


@pytest.mark.integration
@pytest.mark.parametrize("break_it, message", [
    ("patient", "in more than one split"), ("label", "are not among classes"), ("missing", "images cannot be read")])
def test_training_refuses_in_one_line(local_stack, ray_local, sample_manifests, tmp_path, capsys, break_it, message):
    from jobs import pretrain

    rows = pd.read_parquet(sample_manifests / "tasks" / "source.parquet")
    if break_it == "patient":
        test = rows.index[rows["split"] == "val"][0]
        rows.loc[test, "patient_id"] = rows.loc[rows.index[rows["split"] == "train"][0], "patient_id"]
    elif break_it == "label":
        rows.loc[rows.index[0], "label"] = "covid"          # not one of the source task's classes
    else:
        rows.loc[rows.index[0], "uri"] = str(tmp_path / "gone.jpg")
    path = tmp_path / "broken.parquet"
    rows.to_parquet(path)
    cfg = load_config(PretrainConfig, overrides=dict(manifest=str(path), model="resnet18-tiny", image_size=64,
                                                    stage1_epochs=1, num_workers=1, storage_path=str(tmp_path / "ray")))
    capsys.readouterr()
    assert pretrain.main(cfg) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]         # the job's outcome: one line, no traceback (other lines are logs)
    assert message in line and line.startswith("cxr pretrain: refused:") and "Traceback" not in err, err
