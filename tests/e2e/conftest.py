"""One two-node Ray cluster on this machine per test session, 2 CPUs in all."""

import os

import pytest
from helpers import LATENCY_RESOURCE


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a worker node (1 CPU each; the worker carries `LATENCY_RESOURCE`), shared by every
    test that needs Ray: starting Ray costs seconds. Stopped, with every process it started, at the end."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 300 * 2**20, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=1, resources={LATENCY_RESOURCE: 1}, object_store_memory=300 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The address of the shared Ray cluster."""
    return ray_cluster[0].address


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A tiny supernet trained briefly on the synthetic data, saved in the project's format."""
    from helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", trained=True)
