"""The bad-image cap of a supertraining: past --max-bad-images, one line naming the files and exit status 2 (a
file of its own, so the test processes share the slow end-to-end files evenly)."""

import os
import signal
import subprocess
import sys

import mlflow
import pytest

from helpers import BROKEN

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_too_many_bad_images_stop_the_run_with_one_line(ray_session, tmp_path, mlflow_uri, folder_with_bad_images):
    cmd = [sys.executable, "-m", "pipeline.supertrain", "--data", str(folder_with_bad_images), "--epochs", "2"]
    cmd += ["--batch-size", "30", "--workers", "1", "--cpus-per-worker", "0.5", "--decode-cpus", "0.5"]
    # No worker-group restarts: each would stop on the same line, only later.
    cmd += ["--max-bad-images", "1", "--max-failures", "0", "--storage", str(tmp_path / "ray")]
    cmd += ["--mlflow-uri", mlflow_uri]
    cmd += ["--address", ray_session]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 2 undecodable images, more than --max-bad-images 1"), err
    assert all(name in lines[0] for name in BROKEN)
    run = mlflow.MlflowClient(mlflow_uri).search_runs(["1"])[0]
    assert run.info.status == "FAILED"
