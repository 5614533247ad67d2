"""ray_cluster.yaml passes Ray's own cluster-config validation; broken copies do not."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


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
    assert "pip install" in setup and "supervit-pipeline" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CONFIG.read_text()  # nothing listens on every interface
    text = CONFIG.read_text().lower()
    assert not re.search(r"aws_secret_access_key|aws_access_key_id|password|token:", text)


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
