"""pipeline.search end to end on a real local Ray, Optuna and MLflow (SQLite) store."""

import dataclasses
import json

import mlflow
import optuna
import pyarrow.parquet as pq
import pytest

from helpers import check_pyfunc, search_opts
from pipeline.latency_table import LatencyTable
from pipeline.search import search
from pipeline.space import load_space
from supervit import SubnetConfig, get_arch, gflops, load_checkpoint

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
    assert {"pareto.parquet", "pareto.png", "chosen.json", "latency_table.parquet", "optuna.journal"} <= artifacts
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

    # Each budget's answer is a version of the registered model, under an alias naming the budget, tagged with
    # what it is and scored, and it predicts any batch as the library does.
    for c in res.chosen:
        alias = "budget-" + c["budget"].replace(".", "_")
        version = client.get_model_version_by_alias("supervit-tiny-subnets", alias)
        assert version.tags["subnet"] == c["subnet"] and version.tags["search_run_id"] == res.parent_run_id
        assert float(version.tags["test_top1"]) == pytest.approx(c["test_top1"], abs=0.01)
        assert version.tags["latency_mode"] == "eager" and version.tags["hardware"] == c["latency_hardware"]
    check_pyfunc(
        mlflow_uri,
        "models:/supervit-tiny-subnets@budget-0_5x",
        load_checkpoint(trained_checkpoint),
        SubnetConfig.parse(res.chosen[0]["subnet"]),
    )

    table = LatencyTable(tmp_path / "lat.parquet")
    assert len(table) == len({r["subnet"] for r in res.trials})
    # Same seed again: the same subnets, every latency from the table, none measured twice.
    again = search(search_opts(tmp_path, mlflow_uri, trained_checkpoint, name="second", **kw))
    assert [r["subnet"] for r in again.trials] == [r["subnet"] for r in res.trials]
    assert all(r["latency_cached"] for r in again.trials)
    assert len(LatencyTable(tmp_path / "lat.parquet")) == len(table)


def test_latency_as_deployed_and_against_flops(ray_session, tmp_path, mlflow_uri, trained_checkpoint):
    """The default mode times each subnet's compiled program (compile time apart), and the report times every
    uniform cell and every trial in both modes, with the rank correlation of latency and FLOPs."""
    # A space of four uniform cells: compiling costs seconds a subnet.
    space = tmp_path / "small.yaml"
    space.write_text("preset: tiny\ngrids: [4, 6]\nkeep_rates: [[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]\n")
    opts = search_opts(tmp_path, mlflow_uri, trained_checkpoint, budgets=["0.3x"], trials=2, name="deployed")
    res = search(dataclasses.replace(opts, space=str(space), latency_mode=None, latency_report=True))
    assert all(r["compile_s"] > 0 for r in res.trials)  # compiled here, and not counted in the latency
    rows = LatencyTable(tmp_path / "lat.parquet").rows.values()
    cells = {s.name for s in load_space(space).uniform_subnets()}
    assert len(cells) == 4
    for mode in ("eager", "compiled"):  # the two modes never share a row
        measured = {r["subnet"] for r in rows if r["mode"] == mode}
        assert cells | {r["subnet"] for r in res.trials} <= measured, mode
    assert all(r["compile_s"] == 0 for r in rows if r["mode"] == "eager")
    client = mlflow.MlflowClient(mlflow_uri)
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"latency_vs_flops.md", "latency_vs_flops.png"} <= artifacts
    metrics = client.get_run(res.parent_run_id).data.metrics
    assert -1 <= metrics["latency_flops_spearman.compiled"] <= 1 and -1 <= metrics["latency_flops_spearman.eager"] <= 1
    report = open(_download(mlflow_uri, res.parent_run_id, "latency_vs_flops.md", tmp_path / "dl")).read()
    assert report.count("Spearman rank correlation") == 2 and "g6_k1" in report
