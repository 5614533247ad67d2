"""pipeline.search end to end on a real local Ray, Optuna and MLflow (SQLite) store."""

import json

import mlflow
import optuna
import pyarrow.parquet as pq
import pytest

from helpers import search_opts
from pipeline.latency_table import LatencyTable
from pipeline.search import search
from supervit import get_arch, gflops

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _download(uri: str, run_id: str, path: str, dst) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri, dst_path=str(dst))


def test_search_end_to_end_and_latency_cache(ray_session, tmp_path, mlflow_uri, trained_checkpoint):
    arch = get_arch("tiny")
    kw = dict(budgets=["0.5x", "4MFLOPs"], trials=4, seed=3, latency_runs=5)
    res = search(search_opts(tmp_path, mlflow_uri, trained_checkpoint, name="first", **kw))
    budgets = {"0.5x": 0.5 * gflops(arch, None, 10), "4MFLOPs": 0.004}
    assert [c["budget"] for c in res.chosen] == ["0.5x", "4MFLOPs"]
    for c in res.chosen:
        rows = [r for r in res.trials if r["budget"] == c["budget"]]
        assert 1 <= len(rows) <= 4
        assert len({r["subnet"] for r in rows}) == len(rows)  # no subnet evaluated twice
        assert all(r["gflops"] <= budgets[c["budget"]] for r in rows)  # nothing over budget was run
        best = max(rows, key=lambda r: (r["top1"], -r["latency_ms"], -r["gflops"]))
        assert c["subnet"] == best["subnet"] and c["top1"] == best["top1"]
        assert 0 <= c["test_top1"] <= 100 and c["latency_ms"] > 0
        assert c["uniform"]["gflops"] <= budgets[c["budget"]]
    assert sum(not r["latency_cached"] for r in res.trials) >= 1

    client = mlflow.MlflowClient(mlflow_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["supervit.stage"] == "search"
    assert parent.info.run_name == "first"
    assert parent.data.metrics["chosen.0.5x.top1"] == pytest.approx(res.chosen[0]["top1"])
    assert f"| 0.5x | {res.chosen[0]['subnet']} |" in parent.data.tags["mlflow.note.content"]  # the description
    nested = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(nested) == len(res.trials)
    assert all("top1" in r.data.metrics and "latency_ms" in r.data.metrics for r in nested)
    # Each trial's run is named after its subnet.
    assert sorted(r.info.run_name for r in nested) == sorted(r["subnet"] for r in res.trials)
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"pareto.parquet", "pareto.png", "chosen.json", "lat.parquet", "optuna.journal"} <= artifacts
    local = _download(mlflow_uri, res.parent_run_id, "chosen.json", tmp_path / "dl")
    assert [c["subnet"] for c in json.load(open(local))] == [c["subnet"] for c in res.chosen]
    front = pq.read_table(_download(mlflow_uri, res.parent_run_id, "pareto.parquet", tmp_path / "dl")).to_pylist()
    assert len(front) == len(res.trials) and any(r["pareto"] for r in front)
    # The Optuna study of each budget, as optuna-dashboard opens it: every evaluated subnet is a finished trial.
    journal = _download(mlflow_uri, res.parent_run_id, "optuna.journal", tmp_path / "dl")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["first-0.5x", "first-4MFLOPs"]
    study = optuna.load_study(study_name="first-0.5x", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.constraints["flops"] <= 0]
    assert len(done) == len([r for r in res.trials if r["budget"] == "0.5x"])

    table = LatencyTable(tmp_path / "lat.parquet")
    assert len(table) == len({r["subnet"] for r in res.trials})
    # Same seed again: the same subnets, every latency from the table, none measured twice.
    again = search(search_opts(tmp_path, mlflow_uri, trained_checkpoint, name="second", **kw))
    assert [r["subnet"] for r in again.trials] == [r["subnet"] for r in res.trials]
    assert all(r["latency_cached"] for r in again.trials)
    assert len(LatencyTable(tmp_path / "lat.parquet")) == len(table)
