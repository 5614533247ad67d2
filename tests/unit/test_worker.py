"""What the supertraining worker leaves for MLflow: per-epoch logging, and backfill after a killed driver."""

import json

import mlflow

from helpers import metric_steps
from pipeline.supertrain.worker import backfill_epochs, epoch_line, log_epoch


def test_backfill_logs_checkpointed_epochs_missing_from_mlflow(tmp_path, mlflow_uri):
    client = mlflow.MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    for epoch in (0, 1):
        d = tmp_path / "run" / f"checkpoint_{epoch}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(
            json.dumps({"epoch": epoch, "top1/full": 50.0 + epoch, "loss/full": 1.0, "node_id": "n", "top1/g4_k1": 1.0})
        )
    assert log_epoch(client, run_id, {"epoch": 0, "top1/full": 50.0, "loss/full": 1.0})
    assert backfill_epochs(client, run_id, str(tmp_path / "run")) == [1]  # the epoch a killed driver never logged
    assert backfill_epochs(client, run_id, str(tmp_path / "run")) == []  # never twice
    assert metric_steps(mlflow_uri, run_id, "top1/full") == [0, 1]
    assert metric_steps(mlflow_uri, run_id, "loss/full") == [0, 1]
    assert "top1/g4_k1" not in client.get_run(run_id).data.metrics  # cell metrics are logged once, at the end


def test_epoch_line():
    m = {"epoch": 2, "loss/full": 1.25, "loss/grid1": 0.5, "lr": 1e-3, "images_per_s": 812.4, "epoch_time_s": 3.25}
    line = epoch_line(m | {"top1/full": 91.25, "top1/smallest": 80.0}, 20)
    assert line == ("epoch 3/20  full 1.250  grid1 0.500  lr 1.00e-03  812 img/s  3.2s  top1 full 91.2  smallest 80.0")


def test_progress_bar_text():
    from pipeline.common.console import progress_text

    assert progress_text("epoch 3/300", 50, 200, width=8) == "  epoch 3/300 [##......] 50/200 steps"
    assert progress_text("epoch 1/1", 0, 0, width=4) == "  epoch 1/1 [....] 0/0 steps"
