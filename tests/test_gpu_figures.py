"""``experiments/gpu_figures.py`` (the GPU figures to a time budget) in its ``--smoke`` mode on this CPU,
and ``experiments/gpu_tables.py`` (RESULTS.md's GPU section from the JSONs it leaves)."""

import json

import pytest

from experiments import gpu_figures, gpu_tables
from tests.conftest import own_platform


def steps(folder):
    return [f["step"] for f in json.loads((folder / "figures.json").read_text())]


@pytest.fixture
def smoke_args(tmp_path, sample_root, monkeypatch):
    monkeypatch.setenv("CXR_DATA", str(sample_root))
    return ["--out", str(tmp_path / "gpu"), "--export", str(tmp_path / "export"), "--manifests",
            str(tmp_path / "manifests"), "--smoke", "--train-batch-sizes", "", "--variants", "paper-4class",
            "--seeds", "0", "--crossval-recipes", ""]


def test_smoke_chain_stops_at_its_budget_then_resumes_and_the_tables_come_from_its_json(
        local_stack, ray_local, smoke_args, tmp_path):
    with own_platform(tmp_path, "gpufig"):
        # No time at all: the manifests are made, the segmenter (which the rest needs) is
        # skipped, and the command ends cleanly there.
        assert gpu_figures.main([*smoke_args, "--budget-s", "0"]) == 0
        export = tmp_path / "export"
        first = json.loads((export / "figures.json").read_text())
        assert [f["step"] for f in first] == ["machine", "prepare-data", "train-segmenter"]
        assert first[2]["skipped"].startswith("expected")
        assert [p["step"] for p in first[0]["plan"]][:3] == ["start", "prepare-data", "train-segmenter"]

        # Run again with time: the finished step is reused, the rest of the chain runs.
        assert gpu_figures.main(smoke_args) == 0
    done = steps(export)
    assert done.count("prepare-data") == 1
    for step in ("train-segmenter", "segmenter-jsrt", "pretrain", "finetune", "benchmark"):
        assert step in done[3:], step
    ablation = json.loads((export / "ablation-results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in ablation] == [("paper-4class", 0)]   # the registered fine-tune
    pretrain = next(f for f in json.loads((export / "figures.json").read_text()) if f["step"] == "pretrain")
    assert pretrain["epochs"] == 1 and pretrain["median_train_images_per_s"] > 0

    block = gpu_tables.render(export)
    assert "| 4-class accuracy >= 92% |" in block and "| scoring >= 3,000 images/s end to end |" in block
    assert "not measured" in block.split("| 3-class accuracy >= 96.5% |")[1].splitlines()[0]    # no 3-class run


def figures(pretrain_rate: float, steady: float) -> list[dict]:
    return [{"step": "machine", "seconds": 0, "device": "GPU", "date": "2026-11-27T00:00:00", "torch": "2",
             "argv": [], "budget_s": 540, "plan": []},
            {"step": "pretrain", "seconds": 100, "epochs": 10, "median_train_images_per_s": pretrain_rate},
            {"step": "benchmark", "seconds": 50, "images": 40000, "pipeline": {
                "images_per_s": 900, "steady_images_per_s": steady, "startup_s": 20, "scored": 40000}}]


def test_goals_are_marked_from_the_figures():
    met = dict((g, s) for g, _, s in gpu_tables.goals(figures(2900, 2999), []))
    assert met["pretraining >= 2,800 images/s"] == "met"
    assert met["scoring >= 3,000 images/s end to end"] == "not met"
    assert met["4-class accuracy >= 92%"] == "not measured"


def test_the_plan_takes_its_rates_from_the_recorded_run(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(figures(1000, 2000)))
    rates, source = gpu_figures.expected_seconds(path)
    assert rates["pretrain_per_epoch"] == pytest.approx((100 - rates["pretrain_fixed"]) / 10)
    assert rates["benchmark_images_per_s"] == 2000 and "GPU" in source
    assert gpu_figures.expected_seconds(tmp_path / "none.json")[0] == gpu_figures.DEFAULT_EXPECTED


def test_results_md_gpu_block_is_generated_from_the_committed_json(tmp_path):
    assert gpu_tables.main(["--check"]) == 0
    doc = tmp_path / "RESULTS.md"
    doc.write_text(gpu_tables.replace_block(gpu_tables.RESULTS_MD.read_text(), "a transcribed table\n"))
    assert gpu_tables.main(["--check", "--doc", str(doc)]) == 1
