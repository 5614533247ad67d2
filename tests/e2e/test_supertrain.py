"""pipeline.supertrain end to end on a real local Ray and a real MLflow (SQLite) store."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from helpers import metric_steps, one_line_error
from pipeline.supertrain import SupertrainOptions, main, supertrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_resume_after_the_driver_is_killed_then_a_worker_is_killed(ray_session, tmp_path, mlflow_uri, capsys):
    """Two failure drills on one run: the driver killed mid-run, then --resume; in the resumed run a worker killed
    mid-epoch, replaced by Ray Train from the last checkpoint. No epoch is lost or repeated."""
    storage = str(tmp_path / "ray")
    cmd = [sys.executable, "-m", "pipeline.supertrain", "--data", "synthetic", "--epochs", "3", "--batch-size", "32"]
    cmd += ["--warmup-epochs", "0.5", "--workers", "1", "--cpus-per-worker", "1", "--storage", storage]
    cmd += ["--mlflow-uri", mlflow_uri, "--run-name", "drv", "--address", ray_session]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_text() -> str:
        return (tmp_path / "driver.log").read_text()

    try:
        deadline = time.time() + 240
        state_file = tmp_path / "ray" / "drv" / "supervit_state.json"
        run_id = None
        while time.time() < deadline and proc.poll() is None:
            if state_file.exists():  # written by the driver once its MLflow run exists
                run_id = json.loads(state_file.read_text())["mlflow_run_id"]
                # The epoch's line (not its progress bar, "  epoch 1/3 [###..."), shown once logged to MLflow.
                if re.search(r"^epoch 1/3  ", log_text(), re.MULTILINE):
                    break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, nothing else
        proc.wait()
    logged = metric_steps(mlflow_uri, run_id, "top1/full")
    assert logged in ([0], [0, 1]), logged  # killed mid-run
    # What the user read before the kill: our lines, nothing of Ray's or MLflow's.
    console = log_text()
    assert "epoch 1/3" in console and "pid=" not in console and "INFO" not in console, console
    assert "epoch 3/3" not in console
    marker = tmp_path / "killed"
    resume = SupertrainOptions(resume="", storage=storage, mlflow_uri=mlflow_uri, address=ray_session)
    res = supertrain(dataclasses.replace(resume, inject_failure=(2, 1, str(marker))))
    assert res.run_id == run_id  # the same MLflow run, continued
    assert marker.exists()  # the worker really was killed, mid-epoch 2 of the resumed run
    for key in ("top1/full", "loss/full", "images_per_s"):
        assert metric_steps(mlflow_uri, run_id, key) == [0, 1, 2], key
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    # Finished: nothing left to resume.
    capsys.readouterr()
    assert "nothing to resume" in one_line_error(
        main, ["--resume", "--storage", storage, "--mlflow-uri", mlflow_uri], capsys
    )
