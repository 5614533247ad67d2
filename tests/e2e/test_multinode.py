"""Both commands end to end on a two-node Ray cluster (this machine), a real Optuna and a real MLflow (SQLite)
store: workers and trials spread over the nodes, latency pinned to one; the search's results, artifacts, studies
and registered answers; a second search served from the latency table."""

import json

import mlflow
import optuna
import pyarrow.parquet as pq
import pytest

from helpers import (
    LATENCY_RESOURCE,
    best_trial,
    check_pyfunc,
    check_supertrain_run,
    download,
    search_opts,
    supertrain_opts,
)
from pipeline.common.latency_table import LatencyTable
from pipeline.search import search
from pipeline.supertrain import supertrain
from supervit import SubnetConfig, gflops

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_supertrain_then_search_across_two_nodes(ray_cluster, ray_session, tmp_path, mlflow_uri):
    import ray

    cluster, worker = ray_cluster
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    res = supertrain(supertrain_opts(tmp_path, mlflow_uri, name="multi", address=ray_session))
    supernet = check_supertrain_run(res, mlflow_uri, tmp_path, workers=2, epochs=2)
    client = mlflow.MlflowClient(mlflow_uri)
    assert set(client.get_run(res.run_id).data.tags["ray.worker_nodes"].split(",")) == nodes  # a worker a node

    kw = dict(budgets=["0.5x", "4MFLOPs"], trials=3, seed=3, latency_runs=5, address=ray_session)
    kw |= dict(latency_resource=LATENCY_RESOURCE, latency_threads=1, concurrent=2)
    out = search(search_opts(tmp_path, mlflow_uri, res.run_id, name="first", **kw))
    budgets = {"0.5x": 0.5 * gflops(supernet.arch, None, supernet.num_classes), "4MFLOPs": 0.004}
    assert [c["budget"] for c in out.chosen] == ["0.5x", "4MFLOPs"]
    for c in out.chosen:
        rows = [r for r in out.trials if r["budget"] == c["budget"]]
        assert 1 <= len(rows) <= 3
        assert len({r["subnet"] for r in rows}) == len(rows)  # no subnet evaluated twice
        assert all(r["gflops"] <= budgets[c["budget"]] for r in rows)  # nothing over budget was run
        best = best_trial(rows)
        assert c["subnet"] == best["subnet"] and c["top1"] == best["top1"]
        assert 0 <= c["test_top1"] <= 100 and c["latency_ms"] > 0
        assert c["uniform"]["gflops"] <= budgets[c["budget"]]
    assert sum(not r["latency_cached"] for r in out.trials) >= 1
    # Latency only ever measured on the node with the resource, with the fingerprint of that hardware ...
    assert {r["latency_node"] for r in out.trials} == {worker.node_id}
    assert len({r["latency_hardware"] for r in out.trials}) == 1 and "x1 " in out.trials[0]["latency_hardware"]
    # ... while the trials themselves ran on both nodes.
    assert {r["trial_node"] for r in out.trials} == nodes

    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["supervit.stage"] == "search"
    assert parent.info.run_name == "first" and parent.data.tags["supertrain_run_id"] == res.run_id
    assert parent.data.metrics["chosen.0.5x.top1"] == pytest.approx(out.chosen[0]["top1"])
    assert f"| 0.5x | {out.chosen[0]['subnet']} |" in parent.data.tags["mlflow.note.content"]  # the description
    nested = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert len(nested) == len(out.trials)
    assert all("top1" in r.data.metrics and "latency_ms" in r.data.metrics for r in nested)
    # Each trial's run is named after its subnet.
    assert sorted(r.info.run_name for r in nested) == sorted(r["subnet"] for r in out.trials)
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"pareto.parquet", "pareto.png", "chosen.json", "latency_table.parquet", "optuna.journal"} <= artifacts
    local = download(mlflow_uri, out.parent_run_id, "chosen.json", tmp_path / "dl")
    assert [c["subnet"] for c in json.load(open(local))] == [c["subnet"] for c in out.chosen]
    front = pq.read_table(download(mlflow_uri, out.parent_run_id, "pareto.parquet", tmp_path / "dl")).to_pylist()
    assert len(front) == len(out.trials) and any(r["pareto"] for r in front)
    # The Optuna study of each budget, as optuna-dashboard opens it: every evaluated subnet is a finished trial.
    journal = download(mlflow_uri, out.parent_run_id, "optuna.journal", tmp_path / "dl")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == ["first-0.5x", "first-4MFLOPs"]
    study = optuna.load_study(study_name="first-0.5x", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.constraints["flops"] <= 0]
    assert len(done) == len([r for r in out.trials if r["budget"] == "0.5x"])

    # Each budget's answer is a version of the registered model, under an alias naming the budget, tagged with
    # what it is and scored, and it predicts any batch as the library does.
    for c in out.chosen:
        alias = "budget-" + c["budget"].replace(".", "_")
        version = client.get_model_version_by_alias("supervit-tiny-subnets", alias)
        assert version.tags["subnet"] == c["subnet"] and version.tags["search_run_id"] == out.parent_run_id
        assert float(version.tags["test_top1"]) == pytest.approx(c["test_top1"], abs=0.01)
        assert version.tags["latency_mode"] == "eager" and version.tags["hardware"] == c["latency_hardware"]
    check_pyfunc(
        mlflow_uri, "models:/supervit-tiny-subnets@budget-0_5x", supernet, SubnetConfig.parse(out.chosen[0]["subnet"])
    )

    table = LatencyTable(tmp_path / "lat.parquet")
    assert len(table) == len({r["subnet"] for r in out.trials})
    # The first budget again, same seed: the same subnets, every latency from the table, none measured twice.
    again = search(search_opts(tmp_path, mlflow_uri, res.run_id, name="second", **(kw | dict(budgets=["0.5x"]))))
    first = [r["subnet"] for r in out.trials if r["budget"] == "0.5x"]
    assert sorted(r["subnet"] for r in again.trials) == sorted(first)
    assert all(r["latency_cached"] for r in again.trials)
    assert len(LatencyTable(tmp_path / "lat.parquet")) == len(table)
