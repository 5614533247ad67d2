"""pipeline.search end to end on a real local Ray, Optuna and MLflow (SQLite) store."""

import json
import os

import mlflow
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common import run_cli
from pipeline.latency_table import LatencyTable
from pipeline.search import SearchOptions, main, pareto_front, search
from supervit import SubnetSampler, SuperViT, get_arch, gflops, save_checkpoint, supertrain_step
from supervit.data import synthetic

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny supernet trained briefly in the test on the synthetic data, saved in the project's format."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    data = synthetic(arch)
    model = SuperViT(arch, num_classes=data.num_classes, pos_embed_init="sincos")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = SubnetSampler(arch, "sandwich", schedules=True)
    for x, y in torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True):
        supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(path, model, extra={"data": "synthetic", "preset": "tiny"})


def _opts(tmp_path, mlflow_uri, checkpoint, **kw) -> SearchOptions:
    base = dict(
        budgets=["0.5x", "4MFLOPs"],
        checkpoint=str(checkpoint),
        trials=4,
        latency_runs=5,
        trial_cpus=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        latency_table=str(tmp_path / "latency.parquet"),
        seed=3,
    )
    return SearchOptions(**{**base, **kw})


def test_search_end_to_end_and_latency_cache(ray_session, tmp_path, mlflow_uri, checkpoint):
    arch = get_arch("tiny")
    res = search(_opts(tmp_path, mlflow_uri, checkpoint, name="first"))
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
    first_measured = sum(not r["latency_cached"] for r in res.trials)
    assert first_measured >= 1

    client = mlflow.MlflowClient(mlflow_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["supervit.stage"] == "search"
    assert parent.data.metrics["chosen.0.5x.top1"] == pytest.approx(res.chosen[0]["top1"])
    nested = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(nested) == len(res.trials)
    assert all("top1" in r.data.metrics and "latency_ms" in r.data.metrics for r in nested)
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"pareto.parquet", "pareto.png", "chosen.json", "latency.parquet"} <= artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=res.parent_run_id, artifact_path="chosen.json", tracking_uri=mlflow_uri, dst_path=str(tmp_path / "dl")
    )
    assert [c["subnet"] for c in json.load(open(local))] == [c["subnet"] for c in res.chosen]
    front = pq.read_table(
        mlflow.artifacts.download_artifacts(
            run_id=res.parent_run_id,
            artifact_path="pareto.parquet",
            tracking_uri=mlflow_uri,
            dst_path=str(tmp_path / "dl"),
        )
    ).to_pylist()
    assert len(front) == len(res.trials) and any(r["pareto"] for r in front)

    table = LatencyTable(tmp_path / "latency.parquet")
    assert len(table) == len({r["subnet"] for r in res.trials})
    # Same seed again: the same subnets, every latency from the table, none measured twice.
    again = search(_opts(tmp_path, mlflow_uri, checkpoint, name="second"))
    assert [r["subnet"] for r in again.trials] == [r["subnet"] for r in res.trials]
    assert all(r["latency_cached"] for r in again.trials)
    assert len(LatencyTable(tmp_path / "latency.parquet")) == len(table)


def test_pareto_front():
    pts = [(90.0, 5.0), (95.0, 6.0), (89.0, 7.0), (95.0, 6.0), (80.0, 1.0)]
    assert pareto_front(pts) == [True, True, False, True, True]


def _bad(args, capsys) -> str:
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs(ray_session, tmp_path, mlflow_uri, checkpoint, capsys):
    base = [
        "--checkpoint",
        str(checkpoint),
        "--storage",
        str(tmp_path / "ray"),
        "--mlflow-uri",
        mlflow_uri,
        "--latency-table",
        str(tmp_path / "lat.parquet"),
    ]
    for budget in ("2.3GFLOP", "-1GFLOPs", "abc", "0x"):
        assert "accepted forms: 2.3GFLOPs" in _bad(base + [f"--budget={budget}"], capsys)
    assert "unrecognized arguments: --budgte" in _bad(base + ["--budgte", "0.5x"], capsys)
    assert "below the smallest subnet of the space (0.002065 GFLOPs" in _bad(base + ["--budget", "1MFLOPs"], capsys)
    assert "does not exist" in _bad(base + ["--budget", "0.5x", "--space", str(tmp_path / "nope.yaml")], capsys)
    (tmp_path / "broken.yaml").write_text("preset: tiny\ngrids: [4, 6\n")
    assert "not valid YAML" in _bad(base + ["--budget", "0.5x", "--space", str(tmp_path / "broken.yaml")], capsys)
    deit = os.path.join(os.path.dirname(__file__), "..", "search_spaces", "deit_s.yaml")
    assert "are not grids of preset tiny" in _bad(base + ["--budget", "0.5x", "--space", deit], capsys)
    assert "does not exist: run `python -m pipeline.supertrain` first" in _bad(
        ["--budget", "0.5x", "--mlflow-uri", mlflow_uri, "--storage", str(tmp_path / "ray")], capsys
    )
    assert "MLflow server at http://127.0.0.1:9 is unreachable" in _bad(
        ["--budget", "0.5x", "--mlflow-uri", "http://127.0.0.1:9"], capsys
    )
    assert "give at least one --budget" in _bad(base, capsys)
    assert "cannot parse latency budget" in _bad(base + ["--budget", "0.5x", "--latency-budget", "fast"], capsys)
    # nothing was written: no Ray storage, no latency table, no MLflow store
    assert not any(p.exists() for p in (tmp_path / "ray", tmp_path / "lat.parquet", tmp_path / "mlflow.db"))


def test_store_without_a_supertraining_run(ray_session, tmp_path, mlflow_uri, capsys):
    mlflow.MlflowClient(mlflow_uri).create_experiment("something-else")
    capsys.readouterr()  # MLflow's own log lines from creating the store
    assert "no finished supertraining run in the MLflow store" in _bad(
        ["--budget", "0.5x", "--mlflow-uri", mlflow_uri, "--storage", str(tmp_path / "ray")], capsys
    )
