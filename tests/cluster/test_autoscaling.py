"""The autoscaler with ray_cluster.yaml's node types (``ray.cluster_utils.AutoscalingCluster``, Ray's fake
multi-node provider; CPU-only stand-ins for the GPU workers): a supertraining that asks for more workers than the
head has gets workers of the worker type, and they are removed when idle.

The cluster runs in its own PID, mount and network namespace (autoscaling_driver.py): AutoscalingCluster runs
`ray stop --force`, which would stop every Ray process on this machine, and in a network namespace of its own
every Ray address is 127.0.0.1 and no port can clash with anyone's. Needs root, like the `ray up` test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DRIVER = Path(__file__).with_name("autoscaling_driver.py")
REPO = Path(__file__).resolve().parents[2]


def test_autoscaler_adds_workers_of_the_yaml_type_and_removes_them_when_idle():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("the autoscaling test runs its cluster in namespaces: run it as root (as CI does)")
    # A short path: Ray's Unix sockets live under TMPDIR and must stay under 108 characters.
    work = Path(tempfile.mkdtemp(prefix="svt-as-", dir="/tmp"))
    try:
        home, tmp = work / "home", work / "tmp"
        home.mkdir()
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(
            HOME=str(home),
            TMPDIR=str(tmp),
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
            RAY_AUTH_MODE="token",  # Ray 2.60's default for new clusters, with a token of this test's own
            RAY_USAGE_STATS_ENABLED="0",
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
        )
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        script = f"ip link set lo up && exec {sys.executable} {DRIVER} {work}"
        res = subprocess.run(
            ["unshare", "--pid", "--net", "--fork", "--mount-proc", "--kill-child", "bash", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        lines = [line for line in res.stdout.splitlines() if line.startswith("REPORT ")]
        assert res.returncode == 0 and lines, "\n".join((res.stdout + res.stderr).splitlines()[-60:])
        report = json.loads(lines[-1].removeprefix("REPORT "))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{report}")
    assert report["head_cpus"] == 0  # ray_cluster.yaml's head trains nothing
    # Two training workers need two nodes of the worker type (max_workers 2): the autoscaler added exactly those,
    added = report["stand_in_nodes_added"]
    assert len(added) == report["max_workers"] == 2 and report["peak_stand_in_nodes"] == 2
    # the training ran on them,
    assert report["train_worker_nodes"] == sorted(added)
    # and removed them once idle.
    assert report["alive_stand_in_nodes_at_end"] == 0
    # (The autoscaler's log agrees: it launched the worker type only (it may ask for one more node than it gets:
    # max_workers caps it), and terminated both nodes for being idle.)
    assert report["launched"] and {kind for _, kind in report["launched"]} == {report["worker_type"]}
    assert {(node, "idle") for node in added} <= {tuple(x) for x in report["terminated"]}
