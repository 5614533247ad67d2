"""pipeline.search end to end on a real local Ray, Optuna and MLflow (SQLite) store."""

import dataclasses

import mlflow
import pytest

from helpers import download, search_opts
from pipeline.latency_table import LatencyTable
from pipeline.search import search
from pipeline.space import load_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_latency_as_deployed_and_against_flops(ray_session, tmp_path, mlflow_uri, trained_checkpoint):
    """The default mode times each subnet's compiled program (compile time apart), and the report times every
    uniform cell and every trial in both modes, with the rank correlation of latency and FLOPs."""
    # A space of eight subnets, two of them uniform cells: compiling costs seconds a subnet.
    space = tmp_path / "small.yaml"
    space.write_text("preset: tiny\ngrids: [4]\nkeep_rates: [[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]\n")
    opts = search_opts(tmp_path, mlflow_uri, trained_checkpoint, budgets=["0.3x"], trials=2, name="deployed")
    res = search(dataclasses.replace(opts, space=str(space), latency_mode=None, latency_report=True))
    assert all(r["compile_s"] > 0 for r in res.trials)  # compiled here, and not counted in the latency
    rows = LatencyTable(tmp_path / "lat.parquet").rows.values()
    cells = {s.name for s in load_space(space).uniform_subnets()}
    assert cells == {"g4_k0.5", "g4_k1"}
    for mode in ("eager", "compiled"):  # the two modes never share a row
        measured = {r["subnet"] for r in rows if r["mode"] == mode}
        assert cells | {r["subnet"] for r in res.trials} <= measured, mode
    assert all(r["compile_s"] == 0 for r in rows if r["mode"] == "eager")
    client = mlflow.MlflowClient(mlflow_uri)
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"latency_vs_flops.md", "latency_vs_flops.png"} <= artifacts
    metrics = client.get_run(res.parent_run_id).data.metrics
    assert -1 <= metrics["latency_flops_spearman.compiled"] <= 1 and -1 <= metrics["latency_flops_spearman.eager"] <= 1
    report = open(download(mlflow_uri, res.parent_run_id, "latency_vs_flops.md", tmp_path / "dl")).read()
    assert report.count("Spearman rank correlation") == 2 and "g4_k1" in report
