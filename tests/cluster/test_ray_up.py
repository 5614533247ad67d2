"""`ray up ray_cluster.yaml` for real, on this machine: Ray's `local` node provider over SSH on loopback addresses,
a config derived from ray_cluster.yaml (same setup and start commands, see `local_cluster.derive_config`), both
pipeline commands as Ray jobs through the head's job server, MLflow with a login on the head, `ray down`, and
nothing left running. Run with `python -m pytest -m cluster` (as root: the nodes live in PID namespaces)."""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import signal
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from local_cluster import (
    RAY_PROCESS_NAMES,
    SOURCE_CONFIG,
    LocalCloud,
    derive_config,
    free_port,
    http_status,
    tail,
    wait_until,
)

from pipeline.common.cli import UsageError
from pipeline.common.runs import check_mlflow

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SUPERTRAIN = (
    "python -m pipeline.supertrain --preset tiny --data synthetic --epochs 2 --batch-size 32 --warmup-epochs 0.5"
    " --workers 1 --cpus-per-worker 1 --run-name cluster-supertrain"
)
SEARCH = (
    "python -m pipeline.search --budget 0.5x --trials 4 --latency-runs 5 --latency-mode eager --no-latency-report "
    "--trial-cpus 1 --name cluster-search"
)
SERVE = "python -m pipeline.serve --mode eager --batch-sizes 1,4 --latency-runs 5"


@pytest.fixture
def cloud():
    """The nodes (head + 1 worker), the S3 server and the client side; everything stopped and removed after."""
    c = LocalCloud(n_workers=1)
    try:
        yield c.start()
    finally:
        c.stop()


def write_config(cloud: LocalCloud, source: dict) -> Path:
    """The derived cluster config of ``source`` for ``cloud``, as a file."""
    cfg = derive_config(
        source,
        cluster_name=cloud.cluster_name,
        head_ip=cloud.ips[0],
        worker_ips=cloud.ips[1:],
        ssh_user=getpass.getuser(),
        ssh_private_key=str(cloud.key),
        repo_url=cloud.repo_url,
        bucket=f"s3://{cloud.bucket}",
        gcs_port=cloud.gcs_port,
        dashboard_port=cloud.dashboard_port,
        client_port=cloud.client_port,
        mlflow_port=cloud.mlflow_port,
    )
    path = cloud.base / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def alive_nodes(cloud: LocalCloud) -> set[str]:
    """Addresses of the Ray nodes the head's dashboard reports alive (asked with the cluster's token)."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{cloud.dashboard_port}/api/v0/nodes",
        headers={"Authorization": f"Bearer {cloud.ray_token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except OSError:
        return set()
    return {n["node_ip"] for n in nodes if n["state"] == "ALIVE"}


MONITOR_LOG = "tmp/ray/session_latest/logs/monitor.out"  # the head's autoscaler, with its node updaters' output


def worker_joined(cloud: LocalCloud) -> bool:
    """Whether every node is alive in Ray; fails the test at once if the autoscaler's setup of a worker failed."""
    log = cloud.head.home / MONITOR_LOG
    if log.exists() and "update-failed" in log.read_text(errors="replace"):
        pytest.fail(f"the autoscaler could not set up a worker node:\n{cloud.head_log(MONITOR_LOG, 60)}")
    return alive_nodes(cloud) == set(cloud.ips)


def submit(cloud: LocalCloud, address: str, name: str, entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit` (waits for the job, streams its logs); the job's output. Fails the test if the job fails."""
    res = cloud.ray_cli(
        "job", "submit", "--address", address, "--submission-id", name, "--", *entrypoint.split(), timeout=timeout
    )
    assert res.returncode == 0, f"job {name} failed:\n{tail(res, 80)}"
    return res.stdout + res.stderr


def job_status(cloud: LocalCloud, address: str, name: str) -> str:
    """A job's status as `ray job status` prints it (RUNNING, SUCCEEDED, STOPPED, FAILED, ...)."""
    out = cloud.ray_cli("job", "status", "--address", address, name, timeout=60)
    text = out.stdout + out.stderr
    # The CLI words the three final states as sentences and the others as "Status for job 'x': STATE".
    for sentence, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
        if f"Job '{name}' {sentence}" in text:
            return status
    found = re.search(rf"Status for job '{name}': (\w+)", text)
    return found.group(1) if found else ""


def tunnel_to_head(cloud: LocalCloud, head: str, target: str, log: str) -> int:
    """An SSH tunnel from a local port to ``target`` (host:port, as the head resolves it) through the head, as the
    README reaches MLflow and serving; returns the local port."""
    local = free_port()
    cloud.start_process(
        [
            "ssh",
            "-i",
            str(cloud.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-L",
            f"{local}:{target}",
            f"{getpass.getuser()}@{head}",
        ],
        log=log,
    )
    return local


def digit_png() -> bytes:
    """One of scikit-learn's digits as a PNG."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    Image.fromarray((load_digits().images[3] * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def serve_on_the_cluster(cloud: LocalCloud, address: str, config: Path) -> dict:
    """The README's way to serve on the cluster: `python -m pipeline.serve` as a job on the head (its replica on
    the worker: the head has no CPU for it), reached through an SSH tunnel to the head's port, answering a
    request; `ray job stop` stops it cleanly (the job's SIGTERM) and nothing answers after. Returns an answer."""
    import urllib.request

    port = free_port()
    res = cloud.ray_cli(
        "job", "submit", "--address", address, "--submission-id", "serve", "--no-wait",
        "--runtime-env-json", json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}),  # as the README submits it
        "--", *SERVE.split(), "--port", str(port), timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, tail(res)
    head = cloud.ray_cli("get-head-ip", str(config), check=True).stdout.strip().splitlines()[-1]
    # It binds 127.0.0.1 on the head (the default): reached through the tunnel only.
    url = f"http://localhost:{tunnel_to_head(cloud, head, f'localhost:{port}', 'serve-tunnel.log')}"

    def logs() -> str:
        return cloud.ray_cli("job", "logs", "--address", address, "serve").stdout

    def listening() -> bool:
        """Its one line says where it listens (it has started, its run logged), and it answers there."""
        status = job_status(cloud, address, "serve")
        if status in ("FAILED", "STOPPED", "SUCCEEDED"):
            pytest.fail(f"the serving job ended ({status}) before it listened:\n{logs()[-4000:]}")
        return f"serving http://127.0.0.1:{port}" in logs() and http_status(url + "/subnets") == 200

    wait_until(listening, 300, "the serving job to listen", 2)
    with urllib.request.urlopen(urllib.request.Request(url + "/predict", data=digit_png()), timeout=60) as r:
        answer = json.load(r)
    stop = cloud.ray_cli("job", "stop", "--address", address, "serve", timeout=120)
    assert stop.returncode == 0, tail(stop)
    assert wait_until(lambda: job_status(cloud, address, "serve") == "STOPPED", 60, "the serving job to stop", 1)
    out = logs()
    assert "stopping" in out and "stopped" in out.split("stopping", 1)[1], out[-3000:]
    # Serve itself is gone (its controller is detached: a driver killed before it shut Serve down would leave it).
    wait_until(lambda: http_status(url + "/subnets") == 0, 60, "nothing to answer on the serving port", 1)
    return answer


def test_ray_up_runs_the_pipeline_with_mlflow_login_and_ray_down_leaves_nothing(cloud, monkeypatch):
    t0 = time.monotonic()
    config = write_config(cloud, yaml.safe_load(SOURCE_CONFIG.read_text()))
    up = cloud.ray_cli("up", "-y", "--no-config-cache", str(config), timeout=900)
    assert up.returncode == 0, f"ray up failed:\n{tail(up, 80)}"
    t_up = time.monotonic() - t0
    print(f"\nray up done {t_up:.0f}s", flush=True)

    # The autoscaler on the head sets up the worker with the same YAML (worker setup and start commands).
    try:
        wait_until(lambda: worker_joined(cloud), 600, "the worker node to join", 3)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{cloud.head_log(MONITOR_LOG, 60)}")
    t_worker = time.monotonic() - t0
    print(f"worker joined {t_worker:.0f}s", flush=True)

    # Ray's token authentication: the job server refuses a request without the token.
    assert http_status(f"http://127.0.0.1:{cloud.dashboard_port}/api/jobs/") == 401

    # The README's way in: `ray dashboard` forwards the dashboard (job server) over SSH.
    local = free_port()
    cloud.ray_cli_background(
        "dashboard", "-p", str(local), "--remote-port", str(cloud.dashboard_port), str(config), log="dashboard.log"
    )
    address = f"http://127.0.0.1:{local}"
    wait_until(lambda: http_status(address + "/api/version") in (200, 401), 120, "`ray dashboard` forwarding", 1)

    storage = f"s3://{cloud.bucket}/ray"
    submit(cloud, address, "supertrain", f"{SUPERTRAIN} --storage {storage}")
    t_train = time.monotonic() - t0
    print(f"supertrain job done {t_train:.0f}s", flush=True)
    out = submit(cloud, address, "search", f"{SEARCH} --storage {storage}")
    t_search = time.monotonic() - t0
    print(f"search job done {t_search:.0f}s", flush=True)
    assert "| 0.5x |" in out  # the answer table
    answer = serve_on_the_cluster(cloud, address, config)
    t_serve = time.monotonic() - t0
    print(f"serve job answered and stopped {t_serve:.0f}s", flush=True)

    # The head's MLflow server requires a login: nothing without one or with a wrong one ...
    uri = cloud.mlflow_uri
    search_url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
    wrong = base64.b64encode(f"{cloud.mlflow_user}:not-the-password".encode()).decode()
    assert http_status(search_url) == 401
    assert http_status(search_url, {"Authorization": f"Basic {wrong}"}) == 401
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="requires a login: set MLFLOW_TRACKING_USERNAME"):
        check_mlflow(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", cloud.mlflow_user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(UsageError, match="refused the login of user 'admin'"):
        check_mlflow(uri)
    # ... and with the login the pipeline's jobs used (from ~/.supervit/mlflow.env), both runs are there; asked
    # as the README does for the UI: through an SSH tunnel to the head's address (`ray get-head-ip`).
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", cloud.mlflow_password)
    check_mlflow(uri)
    head = cloud.ray_cli("get-head-ip", str(config), check=True).stdout.strip().splitlines()[-1]
    assert head == cloud.head.ip
    tunnel = tunnel_to_head(cloud, head, f"{head}:{cloud.mlflow_port}", "tunnel.log")
    uri = f"http://localhost:{tunnel}"
    wait_until(lambda: http_status(uri + "/health") == 200, 60, "the SSH tunnel to MLflow", 0.5)
    assert http_status(uri + "/api/2.0/mlflow/experiments/search?max_results=5") == 401
    client = mlflow.MlflowClient(uri)
    train_runs = client.search_runs(
        [client.get_experiment_by_name("supervit-supertrain").experiment_id],
        "attributes.run_name = 'cluster-supertrain'",
    )
    assert len(train_runs) == 1
    train = train_runs[0]
    assert train.info.status == "FINISHED"
    assert train.data.params["workers"] == "1" and train.data.params["storage"] == storage
    assert {"checkpoint", "results"} <= {a.path for a in client.list_artifacts(train.info.run_id)}
    versions = client.search_model_versions("name = 'supervit-tiny'")
    assert [v.run_id for v in versions] == [train.info.run_id]
    model_id = versions[0].source.removeprefix("models:/")

    search_exp = client.get_experiment_by_name("supervit-search").experiment_id
    parents = client.search_runs([search_exp], "attributes.run_name = 'cluster-search'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["supertrain_run_id"] == train.info.run_id
    assert client.list_artifacts(parent.info.run_id)
    trials = client.search_runs([search_exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) >= 4

    # The serving job's run: finished (stopped cleanly), linked to its search, its ladder registered as one model.
    serving = client.search_runs([client.get_experiment_by_name("supervit-serve").experiment_id])
    assert len(serving) == 1 and serving[0].info.status == "FINISHED"
    assert serving[0].data.tags["search_run_id"] == parent.info.run_id
    ladder = client.download_artifacts(serving[0].info.run_id, "ladder.json", str(cloud.base))
    assert answer["subnet"] in {r["subnet"] for r in json.loads(Path(ladder).read_text())["subnets"]}
    assert [v.run_id for v in client.search_model_versions("name = 'supervit-tiny-ladder'")] == [serving[0].info.run_id]

    # Artifacts went to the bucket through the MLflow server, and Ray's checkpoints to the bucket directly.
    s3 = cloud.s3()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=cloud.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    prefixes = {"/".join(k.split("/")[:4]) for k in keys}
    assert f"mlflow/{train.info.experiment_id}/{train.info.run_id}/artifacts" in prefixes, sorted(prefixes)
    assert f"mlflow/{search_exp}/{parent.info.run_id}/artifacts" in prefixes, sorted(prefixes)
    assert f"mlflow/{train.info.experiment_id}/models/{model_id}" in prefixes, sorted(prefixes)  # registered model
    assert any(k.startswith("ray/cluster-supertrain/checkpoint_") for k in keys), sorted(prefixes)

    # `ray down` stops Ray on the head. What a cloud provider then terminates, the instances, is the nodes here.
    down = cloud.ray_cli("down", "-y", str(config), timeout=300)
    assert down.returncode == 0, f"ray down failed:\n{tail(down)}"
    t_down = time.monotonic() - t0
    head_left = [cmd for _, _, cmd in cloud.head.processes()]
    assert not [c for c in head_left if any(name in c for name in RAY_PROCESS_NAMES)], head_left
    # The MLflow server is still up (on AWS the instance goes, and the server with it): stop it by the pid the
    # head wrote (as the head numbers it), with its process group.
    server_pid = int((cloud.head.home / "mlflow" / "server.pid").read_text())
    (pid,) = [pid for pid, ns_pid, cmd in cloud.head.processes() if ns_pid == server_pid and "mlflow server" in cmd]
    os.killpg(pid, signal.SIGTERM)
    wait_until(lambda: not [c for _, _, c in cloud.head.processes() if "mlflow" in c], 60, "MLflow to stop", 0.5)
    # The local provider's `ray down` does not stop Ray on the workers (their raylets exit once the head is gone);
    # terminating the nodes does.
    worker_left = [cmd for node in cloud.nodes[1:] for _, _, cmd in node.processes()]
    cloud.stop()
    assert not cloud.leftovers(), cloud.leftovers()
    print(
        f"ray up {t_up:.0f}s, worker joined {t_worker:.0f}s, supertrain job done {t_train:.0f}s, "
        f"search job done {t_search:.0f}s, serve job done {t_serve:.0f}s, ray down done {t_down:.0f}s, "
        f"all stopped {time.monotonic() - t0:.0f}s; "
        f"left on the worker after `ray down`: {len(worker_left)} processes"
    )


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        # a setup command: fails before anything starts
        ("python3 -m pip install -U pip", "python3 -m pip instal -U pip"),
        # the MLflow server's command line: it runs in the background, and `ray up` still fails (it waits for it)
        ("--app-name basic-auth", "--app-name basic-auht"),
    ],
    ids=["setup-command", "mlflow-server-command"],
)
def test_a_broken_command_in_ray_cluster_yaml_fails_ray_up(cloud, broken, expected):
    text = SOURCE_CONFIG.read_text()
    assert text.count(broken) == 1
    config = write_config(cloud, yaml.safe_load(text.replace(broken, expected)))
    up = cloud.ray_cli("up", "-y", "--no-config-cache", str(config), timeout=900)
    out = up.stdout + up.stderr
    assert up.returncode != 0, tail(up)
    assert "Failed to setup head node" in out and expected in out, tail(up)
    cloud.ray_cli("down", "-y", str(config), timeout=300)
    cloud.stop()
    assert not cloud.leftovers(), cloud.leftovers()
