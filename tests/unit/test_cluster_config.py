"""ray_cluster.yaml passes Ray's own cluster-config validation; broken copies do not; its setup and start commands
install and start what the cluster needs (the `ray up` of these commands runs for real in tests/cluster)."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ray_cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_is_valid():
    config = _load()
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema error
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head trains nothing
    assert workers and all(w["max_workers"] >= w.get("min_workers", 0) for w in workers)
    assert any(w["node_config"]["InstanceType"].startswith(("p5.", "p4d.")) for w in workers)


def test_cluster_config_installs_the_project_and_keeps_services_private():
    config = _load()
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and '"supervit-pipeline[node] @ git+' in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CONFIG.read_text()  # nothing listens on every interface
    text = CONFIG.read_text().lower()
    assert not re.search(r"aws_secret_access_key|aws_access_key_id", text)
    # No secret values: passwords, tokens and keys only come from variables set from the local secret files.
    for m in re.finditer(r"(password|token|secret)\w*[\"']?\s*[:=]\s*(\S+)", text):
        assert m.group(2).strip("\"'").startswith(("$", "~", "...")), m.group(0)


@pytest.mark.parametrize(
    "path",
    [("head_node_typo",), ("available_node_types", "gpu_worker", "max_wrkers"), ("auth", "ssh_usr")],
    ids=lambda p: ".".join(p),
)
def test_unknown_keys_are_rejected(path):
    config = _load()
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises(ValidationError, match=f"'{path[-1]}' was unexpected"):
        validate_config(prepare_config(config))


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_extras_install_what_the_launcher_and_the_nodes_run():
    extras = _extras()
    # `ray up` with the AWS provider imports boto3/botocore; `ray job submit` streams logs with ray[default].
    assert {"ray[default]", "boto3", "botocore"} <= _names(extras["cluster"])
    # Nodes: dashboard + job server (ray[default]), MLflow's login (mlflow[auth]), S3 artifacts (boto3).
    assert {"ray[default]", "mlflow[auth]", "boto3"} <= _names(extras["node"])


def test_the_nodes_run_ray_with_token_auth_and_mlflow_with_a_login():
    config = _load()
    # Both secrets come from files on the machine that runs `ray up`, never from this file.
    assert set(config["file_mounts"]) == {"~/.ray/auth_token", "~/.supervit/mlflow.env"}
    assert all(remote == local for remote, local in config["file_mounts"].items())
    head = config["head_start_ray_commands"]
    worker = config["worker_start_ray_commands"]
    assert head[0] == "ray stop" and worker[0] == "ray stop"
    for starts in (head, worker):
        ray_start = next(c for c in starts if "ray start" in c)
        # Ray's token auth, and the MLflow login and address in the environment of every Ray process.
        assert ". ~/.supervit/mlflow.env" in ray_start and "RAY_AUTH_MODE=token" in ray_start
        assert "MLFLOW_TRACKING_URI=" in ray_start
    server = next(c for c in head if "mlflow server" in c)
    assert "--app-name basic-auth" in server
    assert 'MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME"' in server
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in server
    assert "--artifacts-destination s3://" in server
    # `ray up` fails when the server does not come up (it runs in the background).
    assert "/health" in head[-1] and "exit 1" in head[-1]
