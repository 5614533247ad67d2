"""One two-node Ray cluster on this machine per test session, 2 CPUs in all."""

import os
import shutil
import socket

import pytest

from helpers import BROKEN, LATENCY_RESOURCE


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a worker node (1 CPU each; the worker carries `LATENCY_RESOURCE`), shared by every
    test that needs Ray: starting Ray costs seconds. Stopped, with every process it started, at the end."""
    import ray
    from ray.cluster_utils import Cluster

    # Notice a killed worker sooner than the default 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    # The nodes' agents sample every process's metrics every 5 s by default; nothing here reads them, and on two
    # cores that sampling is CPU the tests need. No usage reports either.
    os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Keep up to 3 idle worker processes a node (default: its CPU count, 1 here) for the next decoding tasks
    # instead of starting new ones, each of which imports the decoding code again.
    os.environ.setdefault("RAY_num_workers_soft_limit", "3")
    # Serve's entry point is fixed when its processes start: the one `pipeline.serve --ingress auto` would pick for
    # a local Ray here (HAProxy where installed, as in CI).
    from pipeline.serve.ingress import haproxy_binary, set_local_env

    set_local_env("haproxy" if haproxy_binary() else "proxy")
    cluster = Cluster(
        initialize_head=True,
        # Ports of its own (Ray picks the rest): a parallel pytest worker may run its own cluster beside it.
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 300 * 2**20,
            "include_dashboard": False,
            "dashboard_agent_listen_port": None,
        },
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


@pytest.fixture(scope="session")
def photos(tmp_path_factory, ray_session):
    """An ImageFolder of real photo crops in every format real folders hold, and its Parquet twin."""
    import ray.data

    from helpers import write_photo_dataset

    ray.data.DataContext.get_current().enable_progress_bars = False
    return write_photo_dataset(tmp_path_factory.mktemp("photos"), num_classes=3, train_per_class=10, val_per_class=4)


@pytest.fixture
def folder_with_bad_images(photos, tmp_path):
    """The photo ImageFolder plus two undecodable files at the end of one training class, and one more good
    photo: 30 training files, so the batch sizes below use every file of every epoch (a bad file is met each time,
    never left out as a remainder)."""
    root = tmp_path / "photos"
    shutil.copytree(photos[0], root)
    jpeg = next((root / "train" / "class_0").glob("*.jpg")).read_bytes()
    (root / "train" / "class_1" / "zz_copy.jpg").write_bytes(jpeg)
    (root / "train" / "class_0" / BROKEN[0]).write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train" / "class_0" / BROKEN[1]).write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_bucket(photos):
    """The photo dataset uploaded to a local S3-compatible server (moto) on 127.0.0.1; yields a URI maker."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="datasets")
        root = photos[0].parent
        for f in sorted(root.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), "datasets", f"photos/{f.relative_to(root)}")
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        yield lambda key: f"s3://testing:testing@datasets/photos/{key}?{query}"
    finally:
        server.stop()
