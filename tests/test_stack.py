"""The local stack's MLflow server is real: a run logged over HTTP reads back."""

import urllib.request

from mlflow import MlflowClient


def test_mlflow_server_logs_and_reads_back(local_stack, tmp_path):
    with urllib.request.urlopen(f"{local_stack.tracking_uri}/health") as r:
        assert r.read().strip() == b"OK"
    client = MlflowClient(tracking_uri=local_stack.tracking_uri)
    exp = client.create_experiment("stack-smoke")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "dice", 0.5)
    (tmp_path / "note.txt").write_text("artifact")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.metrics["dice"] == 0.5
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
