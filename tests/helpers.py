"""Helpers shared by test modules (which never import each other)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.cli import run_cli
from pipeline.search import SearchOptions
from pipeline.supertrain import SupertrainOptions
from supervit import ArchConfig, SubnetSampler, SuperViT, get_arch, save_checkpoint, supertrain_step
from supervit.data import synthetic

LATENCY_RESOURCE = "latency_device"  # a custom resource only the second node of the test cluster has

# A small 3-channel architecture: fast forwards with DeiT's channel count, three grids and three pruning stages.
SMALL = ArchConfig(
    patch_size=4,
    embed_dim=48,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    grids=(4, 6, 8),
    prune_blocks=(1, 3, 5),
    in_chans=3,
    name="small",
)


def one_line_error(main, args: list[str], capsys) -> str:
    """Run a command's ``main`` on ``args``; assert exit status 2 and one line on stderr; return that line."""
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged in run ``run_id``."""
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def tiny_checkpoint(path: Path, trained: bool) -> Path:
    """A `tiny` supernet on the synthetic data (one epoch of the sandwich recipe when ``trained``)."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    data = synthetic(arch)
    model = SuperViT(arch, num_classes=data.num_classes, pos_embed_init="sincos")
    if trained:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sampler = SubnetSampler(arch, "sandwich", schedules=True)
        for x, y in torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True):
            supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)
    return save_checkpoint(path, model, extra={"data": "synthetic", "preset": "tiny"})


def supertrain_opts(tmp_path: Path, mlflow_uri: str, **kw) -> SupertrainOptions:
    """A short two-worker supertraining of `tiny` on the synthetic data."""
    base = dict(
        preset="tiny",
        data="synthetic",
        epochs=2,
        batch_size=32,
        warmup_epochs=0.5,
        workers=2,
        cpus_per_worker=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        name="t",
    )
    return SupertrainOptions(**{**base, **kw})


def search_opts(tmp_path: Path, mlflow_uri: str, checkpoint: Path, **kw) -> SearchOptions:
    """A small search of a `tiny` checkpoint: few trials, short latency measurements, one CPU per trial."""
    base = dict(
        budgets=["0.6x"],
        checkpoint=str(checkpoint),
        trials=3,
        latency_runs=3,
        trial_cpus=1,
        seed=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        latency_table=str(tmp_path / "lat.parquet"),
    )
    return SearchOptions(**{**base, **kw})


def check_supertrain_run(res, mlflow_uri: str, tmp_path: Path, workers: int, epochs: int) -> None:
    """Params, per-epoch metrics, final table, artifacts, checkpoint and registered model of a finished run."""
    from supervit import load_checkpoint

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["workers"] == str(workers) and params["preset"] == "tiny" and params["epochs"] == str(epochs)
    assert params["arch.embed_dim"] == str(get_arch("tiny").embed_dim) and params["train_size"] == "256"
    assert {"ray_version", "torch_version", "lr", "batch_size", "seed", "recipe"} <= set(params)
    roles = [f"loss/{r.name}" for r in SubnetSampler(get_arch("tiny"), params["recipe"]).sample()]
    assert params["recipe"] == "balanced"  # the default
    assert roles == ["loss/full", "loss/smallest_grid", "loss/grid1", "loss/grid2"]
    for key in (*roles, "lr", "epoch_time_s", "images_per_s", "top1/full", "top1/smallest"):
        assert metric_steps(mlflow_uri, res.run_id, key) == list(range(epochs)), key
    arch = get_arch("tiny")
    cells = [f"g{g}_k{r:g}" for g in arch.grids for r in arch.keep_rates]
    assert set(res.table) == set(cells)
    for cell in cells:
        assert 0 <= run.data.metrics[f"top1/{cell}"] <= 100
        assert run.data.metrics[f"test_top1/{cell}"] == pytest.approx(res.table[cell]["test_top1"])
    # The run's description in the MLflow UI is the accuracy table.
    assert "| grid \\ keep |" in run.data.tags["mlflow.note.content"]
    results = {os.path.basename(a.path) for a in client.list_artifacts(res.run_id, "results")}
    assert results == {"accuracy_table.md", "accuracy_table.csv", "accuracy_table.png"}
    ckpt = mlflow.artifacts.download_artifacts(
        run_id=res.run_id,
        artifact_path="checkpoint/model.safetensors",
        tracking_uri=mlflow_uri,
        dst_path=str(tmp_path / "dl"),
    )
    assert load_checkpoint(ckpt).arch == arch
    versions = client.search_model_versions("name='supervit-tiny'")
    assert [v.run_id for v in versions] == [res.run_id]
    assert run.data.tags["ray.storage_path"] == res.storage_path and os.path.isdir(res.storage_path)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (None for parameters without one)."""

    def __init__(self, named_params, lr):
        self.names = [n for n, _ in named_params]
        super().__init__([p for _, p in named_params], lr=lr)
        self.seen = []

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.seen.append(
            {n: None if p.grad is None else p.grad.clone() for n, p in zip(self.names, params, strict=True)}
        )
        return super().step(closure)
