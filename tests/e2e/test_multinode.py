"""Both commands on a two-node Ray cluster (this machine): workers and trials spread, latency pinned."""

import mlflow
import pytest

from helpers import LATENCY_RESOURCE, check_supertrain_run, search_opts, supertrain_opts
from pipeline.search import search
from pipeline.supertrain import supertrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_supertrain_then_search_across_two_nodes(ray_cluster, ray_session, tmp_path, mlflow_uri):
    import ray

    cluster, worker = ray_cluster
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    res = supertrain(supertrain_opts(tmp_path, mlflow_uri, name="multi", address=ray_session))
    check_supertrain_run(res, mlflow_uri, tmp_path, workers=2, epochs=2)
    run = mlflow.MlflowClient(mlflow_uri).get_run(res.run_id)
    assert set(run.data.tags["ray.worker_nodes"].split(",")) == nodes  # one worker on each node

    kw = dict(latency_resource=LATENCY_RESOURCE, latency_threads=1, warm_start=False, concurrent=2)
    out = search(
        search_opts(tmp_path, mlflow_uri, res.run_id, trials=8, latency_runs=5, seed=0, address=ray_session, **kw)
    )
    assert out.chosen[0]["gflops"] <= 0.6 * res.table["g8_k1"]["gflops"] + 1e-12
    parent = mlflow.MlflowClient(mlflow_uri).get_run(out.parent_run_id)
    assert parent.data.tags["supertrain_run_id"] == res.run_id
    # Latency only ever measured on the node with the resource, with the fingerprint of that hardware.
    assert {r["latency_node"] for r in out.trials} == {worker.node_id}
    assert len({r["latency_hardware"] for r in out.trials}) == 1 and "x1 " in out.trials[0]["latency_hardware"]
    # Trials themselves ran on both nodes.
    assert {r["trial_node"] for r in out.trials} == nodes
