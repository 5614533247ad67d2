"""Both commands on a two-node Ray cluster (this machine): workers and trials spread, latency pinned."""

import mlflow
import pytest
from conftest import LATENCY_RESOURCE
from test_supertrain import _opts, check_supertrain_run

from pipeline.search import SearchOptions, search
from pipeline.supertrain import supertrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_supertrain_then_search_across_two_nodes(ray_cluster, ray_session, tmp_path, mlflow_uri):
    import ray

    cluster, worker = ray_cluster
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    res = supertrain(_opts(tmp_path, mlflow_uri, run_name="multi", address=ray_session))
    check_supertrain_run(res, mlflow_uri, tmp_path, workers=2, epochs=2)
    run = mlflow.MlflowClient(mlflow_uri).get_run(res.run_id)
    assert set(run.data.tags["ray.worker_nodes"].split(",")) == nodes  # one worker on each node

    out = search(
        SearchOptions(
            budgets=["0.6x"],
            checkpoint=res.run_id,
            trials=8,
            latency_runs=5,
            trial_cpus=1,
            seed=0,
            storage=str(tmp_path / "ray"),
            mlflow_uri=mlflow_uri,
            latency_table=str(tmp_path / "lat.parquet"),
            address=ray_session,
            latency_resource=LATENCY_RESOURCE,
            latency_threads=1,
            warm_start=False,
            concurrent=2,
        )
    )
    assert out.chosen[0]["gflops"] <= 0.6 * res.table["g8_k1"]["gflops"] + 1e-12
    assert parent_link(mlflow_uri, out.parent_run_id) == res.run_id
    # Latency only ever measured on the node with the resource, with the fingerprint of that hardware.
    assert {r["latency_node"] for r in out.trials} == {worker.node_id}
    assert len({r["latency_hardware"] for r in out.trials}) == 1 and "x1 " in out.trials[0]["latency_hardware"]
    # Trials themselves ran on both nodes.
    assert {r["trial_node"] for r in out.trials} == nodes


def parent_link(uri: str, parent_id: str) -> str:
    return mlflow.MlflowClient(uri).get_run(parent_id).data.tags["supertrain_run_id"]
