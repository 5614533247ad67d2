"""pipeline.supertrain end to end on a real local Ray and a real MLflow (SQLite) store."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from pipeline.common import run_cli
from pipeline.supertrain import SupertrainOptions, main, supertrain
from supervit import ArchConfig, SubnetSampler, SuperViT, get_arch, load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _opts(tmp_path, mlflow_uri, **kw) -> SupertrainOptions:
    base = dict(
        preset="tiny",
        data="synthetic",
        epochs=2,
        batch_size=32,
        warmup_epochs=0.5,
        workers=2,
        cpus_per_worker=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        run_name="t",
    )
    return SupertrainOptions(**{**base, **kw})


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def check_supertrain_run(res, mlflow_uri: str, tmp_path, workers: int, epochs: int) -> None:
    """Params, per-epoch metrics, final table, artifacts, checkpoint and registered model of a finished run."""
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["workers"] == str(workers) and params["preset"] == "tiny" and params["epochs"] == str(epochs)
    assert params["arch.embed_dim"] == str(get_arch("tiny").embed_dim) and params["train_size"] == "256"
    assert {"ray_version", "torch_version", "lr", "batch_size", "seed", "recipe"} <= set(params)
    roles = [f"loss/{r.name}" for r in SubnetSampler(get_arch("tiny"), params["recipe"]).sample()]
    assert params["recipe"] == "balanced"  # the default
    assert roles == ["loss/full", "loss/smallest_grid", "loss/grid1", "loss/grid2"]
    for key in (
        *roles,
        "lr",
        "epoch_time_s",
        "images_per_s",
        "top1/full",
        "top1/smallest",
    ):
        assert _steps(mlflow_uri, res.run_id, key) == list(range(epochs)), key
    arch = get_arch("tiny")
    cells = [f"g{g}_k{r:g}" for g in arch.grids for r in arch.keep_rates]
    assert set(res.table) == set(cells)
    for cell in cells:
        assert 0 <= run.data.metrics[f"top1/{cell}"] <= 100
        assert run.data.metrics[f"test_top1/{cell}"] == pytest.approx(res.table[cell]["test_top1"])
    results = {os.path.basename(a.path) for a in client.list_artifacts(res.run_id, "results")}
    assert results == {"accuracy_table.md", "accuracy_table.csv", "accuracy_table.png"}
    ckpt = mlflow.artifacts.download_artifacts(
        run_id=res.run_id,
        artifact_path="checkpoint/model.safetensors",
        tracking_uri=mlflow_uri,
        dst_path=str(tmp_path / "dl"),
    )
    assert load_checkpoint(ckpt).arch == arch
    versions = client.search_model_versions("name='supervit-tiny'")
    assert [v.run_id for v in versions] == [res.run_id]
    assert run.data.tags["ray.storage_path"] == res.storage_path and os.path.isdir(res.storage_path)


def test_killed_worker_is_replaced_and_no_epoch_is_lost_or_repeated(ray_session, tmp_path, mlflow_uri):
    marker = tmp_path / "killed"
    res = supertrain(_opts(tmp_path, mlflow_uri, epochs=3, run_name="fail", inject_failure=(1, 2, str(marker))))
    assert marker.exists()  # the worker really was killed, mid-epoch 1
    for key in ("top1/full", "loss/full", "images_per_s"):
        assert _steps(mlflow_uri, res.run_id, key) == [0, 1, 2], key
    assert mlflow.MlflowClient(mlflow_uri).get_run(res.run_id).info.status == "FINISHED"


def test_resume_after_the_driver_is_killed(ray_session, tmp_path, mlflow_uri):
    storage = str(tmp_path / "ray")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.supertrain",
        "--data",
        "synthetic",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--warmup-epochs",
        "0.5",
        "--workers",
        "1",
        "--cpus-per-worker",
        "1",
        "--storage",
        storage,
        "--mlflow-uri",
        mlflow_uri,
        "--run-name",
        "drv",
        "--address",
        ray_session,
    ]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        state_file = tmp_path / "ray" / "drv" / "supervit_run.json"
        run_id = None
        while time.time() < deadline and proc.poll() is None:
            if state_file.exists():  # written by the driver once its MLflow run exists
                run_id = json.loads(state_file.read_text())["mlflow_run_id"]
                if _steps(mlflow_uri, run_id, "top1/full") == [0]:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, nothing else
        proc.wait()
    assert run_id and _steps(mlflow_uri, run_id, "top1/full") == [0]
    res = supertrain(SupertrainOptions(resume="", storage=storage, mlflow_uri=mlflow_uri, address=ray_session))
    assert res.run_id == run_id  # the same MLflow run, continued
    assert _steps(mlflow_uri, run_id, "top1/full") == [0, 1, 2]
    assert _steps(mlflow_uri, run_id, "loss/full") == [0, 1, 2]
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    # Finished: nothing left to resume.
    assert run_cli(main, ["--resume", "--storage", storage, "--mlflow-uri", mlflow_uri]) == 2


def _bad(args, capsys) -> str:
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_fail_before_training(ray_session, tmp_path, mlflow_uri, capsys):
    base = ["--storage", str(tmp_path / "ray"), "--mlflow-uri", mlflow_uri, "--epochs", "1"]
    assert "unknown preset 'huge'" in _bad(base + ["--preset", "huge"], capsys)
    assert str(tmp_path / "absent") in _bad(base + ["--data", str(tmp_path / "absent")], capsys)
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in _bad(base + ["--data", str(tmp_path / "empty")], capsys)
    other = ArchConfig(patch_size=2, embed_dim=32, depth=2, num_heads=2, grids=(4, 8), prune_blocks=(1,), in_chans=1)
    save_checkpoint(tmp_path / "other.safetensors", SuperViT(other, num_classes=10))
    assert "expected tiny" in _bad(base + ["--init-from", str(tmp_path / "other.safetensors")], capsys)
    assert "nothing to resume" in _bad(base + ["--resume"], capsys)
    assert "MLflow server at http://127.0.0.1:9 is unreachable" in _bad(
        ["--mlflow-uri", "http://127.0.0.1:9", "--storage", str(tmp_path / "ray")], capsys
    )
    assert "cannot connect to Ray at 127.0.0.1:9" in _bad(base + ["--address", "127.0.0.1:9"], capsys)
    (tmp_path / "bad.yaml").write_text("epochs: 1\ncolour: red\n")
    assert "unknown options colour" in _bad(base + ["--config", str(tmp_path / "bad.yaml")], capsys)
    assert not os.path.exists(tmp_path / "ray")  # nothing was written


def test_backfill_logs_checkpointed_epochs_missing_from_mlflow(tmp_path, mlflow_uri):
    from pipeline.supertrain import backfill_epochs, log_epoch

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
    assert _steps(mlflow_uri, run_id, "top1/full") == [0, 1] and _steps(mlflow_uri, run_id, "loss/full") == [0, 1]
    assert "top1/g4_k1" not in client.get_run(run_id).data.metrics  # cell metrics are logged once, at the end
