"""Run by test_autoscaling.py inside its own PID and mount namespace (``ray.cluster_utils.AutoscalingCluster``
runs `ray stop --force`, which stops every Ray process it can see: here, only its own).

An autoscaling cluster with the node types of ray_cluster.yaml (the head type's resources; the GPU worker type
with a CPU-only stand-in for the resources Ray detects on a GPU machine, and its min/max workers), a supertraining
that asks for more workers than the head has, then idle: prints a JSON report of what the autoscaler did.

Usage: python autoscaling_driver.py WORKDIR
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import AutoscalingCluster

REPO = Path(__file__).resolve().parents[2]
MARKER = "stand_in_worker"  # a resource only the stand-in worker type has: tells its nodes apart
IDLE_TIMEOUT_MINUTES = 0.1  # ray_cluster.yaml says 10; the test cannot wait that long


class FakeCluster(AutoscalingCluster):
    """``AutoscalingCluster`` with its base config built here: Ray 2.60's wheel lacks the
    fake_multi_node/example.yaml that it reads (FileNotFoundError)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        assert not autoscaler_v2
        config = {
            "cluster_name": "fake_multinode",
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
            **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        }
        config.update(config_kwargs)
        return config


def node_types_from_yaml() -> tuple[dict, dict, str]:
    """(head resources, worker node types, name of the worker type) from ray_cluster.yaml."""
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head = dict(types[cfg["head_node_type"]].get("resources") or {})
    workers = {}
    for name, t in types.items():
        if name == cfg["head_node_type"]:
            continue
        # CPU-only stand-in: one CPU (Ray would detect the GPUs, CPUs and accelerator_type of the real machine).
        resources = {**(t.get("resources") or {}), "CPU": 1, MARKER: 1}
        workers[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": t.get("min_workers", 0),
            "max_workers": t["max_workers"],
        }
    (name,) = workers  # one worker type in ray_cluster.yaml
    return head, workers, name


def main(workdir: Path) -> dict:
    head, workers, worker_type = node_types_from_yaml()
    max_workers = workers[worker_type]["max_workers"]
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    cluster = FakeCluster(
        head_resources=dict(head),
        worker_node_types=workers,
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
        max_workers=cfg["max_workers"],
        upscaling_speed=cfg["upscaling_speed"],
    )
    report: dict = {"head_resources": head, "worker_type": worker_type, "max_workers": max_workers}
    t0 = time.monotonic()
    cluster.start()
    try:
        ray.init(address="auto")
        report["head_cpus"] = ray.cluster_resources().get("CPU", 0)
        seen: dict[str, float] = {}  # stand-in worker node id -> first time seen alive
        peak = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(MARKER)]
                peak[0] = max(peak[0], len(alive))
                for n in alive:
                    seen.setdefault(n["NodeID"], time.monotonic() - t0)
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        from pipeline.supertrain import SupertrainOptions, supertrain

        res = supertrain(
            SupertrainOptions(
                preset="tiny",
                data="synthetic",
                epochs=1,
                batch_size=32,
                warmup_epochs=0.5,
                workers=max_workers,  # the head has no CPU: every worker needs a new node
                cpus_per_worker=1,
                storage=str(workdir / "ray"),
                mlflow_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                name="autoscale",
            )
        )
        report["train_done_s"] = time.monotonic() - t0
        report["train_worker_nodes"] = sorted(
            mlflow_tag(f"sqlite:///{workdir / 'mlflow.db'}", res.run_id, "ray.worker_nodes").split(",")
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(MARKER)]:
                break
            time.sleep(1)
        stop.set()
        watcher.join()
        report["removed_idle_s"] = time.monotonic() - t0
        report["stand_in_nodes_added"] = sorted(seen)
        report["peak_stand_in_nodes"] = peak[0]
        report["alive_stand_in_nodes_at_end"] = len(
            [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(MARKER)]
        )
        # The autoscaler's reasons for what it did (its log, in this namespace's Ray session).
        log = Path(tempfile.gettempdir(), "ray", "session_latest", "logs", "monitor.log").read_text()
        report["launched"] = re.findall(r"Launching (\d+) nodes, type (\S+?)\.", log)
        report["terminated"] = re.findall(r"Terminating the node with id (\S+) and ip \S+\. \((\w+)\)", log)
    finally:
        ray.shutdown()
        cluster.shutdown()  # `ray stop --force`: inside this namespace, only this cluster
    return report


def mlflow_tag(uri: str, run_id: str, key: str) -> str:
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id).data.tags[key]


if __name__ == "__main__":
    out = main(Path(sys.argv[1]))
    print("REPORT " + json.dumps(out), flush=True)
