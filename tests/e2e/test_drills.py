"""Failure drills for the search: a killed driver then --resume, and a killed trial."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from helpers import best_trial, tiny_checkpoint
from pipeline.search import SearchOptions, search

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", trained=False)


def _nested(uri, parent):
    client = mlflow.MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_resume_after_the_search_driver_is_killed_then_a_trial_is_killed(ray_session, tmp_path, mlflow_uri, checkpoint):
    """Two failure drills on one search: the driver killed mid-search, then --resume; in the resumed search a
    trial's process killed, and the trial retried. Every trial finishes once; the answer is the best of them."""
    storage = tmp_path / "ray"
    cmd = [sys.executable, "-m", "pipeline.search", "--budget", "0.6x", "--checkpoint", str(checkpoint)]
    cmd += ["--trials", "6", "--latency-runs", "3", "--latency-mode", "eager", "--no-latency-report"]
    cmd += ["--trial-cpus", "1", "--seed", "1", "--storage", str(storage)]
    cmd += ["--mlflow-uri", mlflow_uri, "--latency-table", str(tmp_path / "lat.parquet"), "--name", "drv"]
    cmd += ["--address", ray_session]
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state_file = storage / "drv" / "supervit_state.json"
    finished: set[str] = set()
    try:
        deadline = time.time() + 240
        record = storage / "drv" / "finished-budget0.json"
        while time.time() < deadline and proc.poll() is None and len(finished) < 2:
            try:  # written atomically by the driver as trials finish
                finished = {r["subnet"] for r in json.loads(record.read_text())}
            except FileNotFoundError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing the driver started is left running
    assert len(finished) >= 2
    console = (tmp_path / "driver.log").read_text()  # what the user read: one line per trial, nothing of Ray's
    assert console.count("[0.6x] trial ") >= 2 and "pid=" not in console and "study created" not in console, console
    parent = json.loads(state_file.read_text())["mlflow_run_id"]
    marker = tmp_path / "killed"
    resume = SearchOptions(resume="", storage=str(storage), mlflow_uri=mlflow_uri, address=ray_session)
    res = search(dataclasses.replace(resume, inject_failure=str(marker)))
    assert res.parent_run_id == parent
    assert marker.exists()  # a trial process of the resumed search really died ...
    assert len(res.trials) == 6 and len({r["subnet"] for r in res.trials}) == 6  # ... and was retried
    best = best_trial(res.trials)
    assert res.chosen[0]["subnet"] == best["subnet"]
    names = [r.info.run_name for r in _nested(mlflow_uri, parent) if "top1" in r.data.metrics]
    for subnet in finished:  # a trial the killed driver had finished ran exactly once
        assert names.count(subnet) == 1, (subnet, names)
    assert mlflow.MlflowClient(mlflow_uri).get_run(parent).info.status == "FINISHED"
