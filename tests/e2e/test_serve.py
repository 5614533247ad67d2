"""A registered subnet served over HTTP by `mlflow models serve`, answering like the library's forward."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.registry import budget_alias, log_subnet_model
from supervit import SubnetConfig, SuperViT, get_arch

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_served_model_answers_like_the_library(tmp_path, mlflow_uri):
    torch.manual_seed(0)
    model = SuperViT(get_arch("tiny"), num_classes=10).eval()
    subnet = SubnetConfig(6, 0.5)
    alias = budget_alias("0.5x")
    log_subnet_model(
        model, subnet, name="model", registered_model="supervit-serve", alias=alias, tracking_uri=mlflow_uri
    )

    port = _free_port()
    bindir = Path(sys.executable).parent
    # The server execs `uvicorn` from PATH: the one installed beside this Python.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(bindir / "mlflow"), "models", "serve", "-m", f"models:/supervit-serve@{alias}"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "the model server did not come up in 240 s"
            time.sleep(1)
        x = torch.randn(5, 1, 16, 16)
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.numpy().tolist()})
        with torch.no_grad():
            expected = model(x, subnet).numpy()
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-5, atol=1e-5)
    finally:
        _stop_group(proc)
        log.close()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the server is left running


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop the server and the workers it started (our own process group, by its pid): TERM, then KILL."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:  # a killed group member may take a moment to be reaped by init
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
