"""The config the `ray up` test runs is ray_cluster.yaml with a few substitutions, nothing else (fast: no Ray, no
SSH; part of the default test run)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from local_cluster import SOURCE_CONFIG, derive_config
from ray.autoscaler._private.util import prepare_config, validate_config

PROGRAMS = re.compile(r"\b(ray stop|ray start|mlflow server|curl|pip install|kill|chmod|mkdir)\b")


def _derive(source: dict) -> dict:
    return derive_config(
        source,
        cluster_name="svt-test",
        head_ip="127.200.1.10",
        worker_ips=["127.200.1.11"],
        ssh_user="root",
        ssh_private_key="/tmp/key",
        repo_url="git+file://localhost/tmp/repo@main",
        bucket="s3://local-bucket",
        gcs_port=40001,
        dashboard_port=40002,
        client_port=40003,
        mlflow_port=40004,
    )


def _source() -> dict:
    return yaml.safe_load(SOURCE_CONFIG.read_text())


def test_derived_config_is_a_valid_local_cluster_config():
    derived = _derive(_source())
    validate_config(prepare_config(copy.deepcopy(derived)))  # raises on any schema error
    assert derived["provider"] == {"type": "local", "head_ip": "127.200.1.10", "worker_ips": ["127.200.1.11"]}


def test_same_commands_with_only_addresses_ports_repository_and_bucket_substituted():
    source, derived = _source(), _derive(_source())
    # Everything but the provider, the login and the node types is the source's, file_mounts included.
    for key in ("file_mounts", "initialization_commands", "head_setup_commands", "worker_setup_commands"):
        assert derived[key] == source[key], key
    assert [c.replace("git+file://localhost/tmp/repo@main", "<repo>") for c in derived["setup_commands"]] == [
        re.sub(r"git\+https://\S+?@main", "<repo>", c) for c in source["setup_commands"]
    ]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert len(derived[key]) == len(source[key])
        for src, dst in zip(source[key], derived[key], strict=True):
            assert PROGRAMS.findall(dst) == PROGRAMS.findall(src), (src, dst)
    head = " ".join(derived["head_start_ray_commands"])
    assert "6379" not in head and ":5000" not in head and "hostname -I" not in head and "CHANGE-ME" not in head
    assert "--port=40001" in head and "--port 40004" in head and "s3://local-bucket/mlflow" in head
    # The head type's resources (no CPU: the head trains nothing) reach the head as Ray's cloud providers pass them.
    assert """RAY_OVERRIDE_RESOURCES='{"CPU": 0}' ray start --head""" in head
    worker = " ".join(derived["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:40001" in worker and "$RAY_HEAD_IP:40004" in worker


@pytest.mark.parametrize("gone", ["--port=6379", "--port 5000", "s3://CHANGE-ME-bucket", "git+https://github.com"])
def test_a_substitution_that_no_longer_matches_ray_cluster_yaml_is_an_error(gone):
    text = SOURCE_CONFIG.read_text().replace(gone, "--something-else")
    with pytest.raises(ValueError, match="ray_cluster.yaml changed"):
        _derive(yaml.safe_load(text))
