"""Supertrain one SuperViT on Ray Train and track it in MLflow.

    python -m pipeline.supertrain                      # embedded default: preset tiny on digits, local Ray
    python -m pipeline.supertrain --preset deit_s --data /data/imagenet --workers 8 --storage s3://bucket/runs

Every option is documented by ``--help``; ``--config FILE.yaml`` takes the same options as a file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervit import get_arch, gflops
from supervit.data import Splits, redact

from ..common.cli import parse_options, quiet_libraries
from ..common.runs import (
    STAGE_TAG,
    RunState,
    check_mlflow,
    default_storage,
    finish_mlflow_run,
    init_ray,
    open_mlflow_run,
    resolve_tracking_uri,
    resume_or_name,
    save_state,
    ui_command,
)
from .options import SupertrainOptions
from .report import accuracy_heatmap, accuracy_table, cells
from .trainer import check_bad_images, fit, place_workers, streamed_data

__all__ = ["SupertrainResult", "supertrain", "main"]


@dataclass
class SupertrainResult:
    """What a finished supertraining leaves behind."""

    run_id: str
    tracking_uri: str
    checkpoint_path: str  # own-format .safetensors of the final model
    storage_path: str
    preset: str
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # cell name -> {gflops, top1, test_top1}


def _params(opts: SupertrainOptions, splits: Splits, storage: str, name: str, use_gpu: bool) -> dict:
    import ray
    import torch

    params = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("inject_failure", "resume")}
    params["data"] = redact(opts.data)  # a bucket URI may carry credentials; MLflow shows params to everyone
    params.update({f"arch.{k}": v for k, v in opts.arch.to_dict().items()})
    return params | dict(
        train_size=len(splits.train),
        search_size=len(splits.search),
        test_size=len(splits.test),
        num_classes=splits.num_classes,
        storage=storage,
        run_name=name,
        use_gpu=use_gpu,
        ray_version=ray.__version__,
        torch_version=torch.__version__,
        gflops_full=round(gflops(opts.arch), 4),
    )


def _state(opts: SupertrainOptions, run_id: str, tracking_uri: str, status: str) -> RunState:
    saved = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("inject_failure", "resume")}
    return RunState(run_id, tracking_uri, status, saved)


def supertrain(opts: SupertrainOptions, verbose: bool = False) -> SupertrainResult:
    """Run (or resume) one supertraining and log it to MLflow.

    Bad input raises `UsageError` (or a `CheckpointError`/`DataError`) before anything is written.
    """
    import mlflow

    from .worker import backfill_epochs

    storage = opts.storage or default_storage()
    keep = ("address", "storage", "mlflow_uri", "inject_failure")
    opts, name, state = resume_or_name(opts, storage, "run", ("supertrain", opts.preset, opts.data), keep)
    tracking_uri = resolve_tracking_uri(opts.mlflow_uri or (state.tracking_uri if state else None))
    opts = opts.resolved()
    check_mlflow(tracking_uri)
    splits = opts.validate()

    init_ray(opts.address, verbose=verbose)
    streamed, datasets = streamed_data(opts, splits)
    opts, use_gpu = place_workers(opts, streamed is not None)
    run_dir = f"{storage.rstrip('/')}/{name}"
    tags = {
        STAGE_TAG: "supertrain",
        "preset": opts.preset,
        "dataset": splits.name,
        "recipe": opts.recipe,
        "ray.run_name": name,
        "ray.storage_path": run_dir,
    }
    params = _params(opts, splits, storage, name, use_gpu)
    run_id = open_mlflow_run(tracking_uri, opts.experiment, name, state, tags, params)
    if state is not None:
        backfill_epochs(mlflow.MlflowClient(tracking_uri), run_id, run_dir)
    save_state(storage, name, _state(opts, run_id, tracking_uri, "running"))
    print(
        f"supertraining {name}: {opts.preset} on {splits.name}, {opts.workers} worker(s), {opts.epochs} epochs, "
        f"recipe {opts.recipe}; MLflow run {run_id}",
        flush=True,
    )
    try:
        result = fit(
            opts,
            name=name,
            storage=storage,
            tracking_uri=tracking_uri,
            run_id=run_id,
            use_gpu=use_gpu,
            streamed=streamed,
            datasets=datasets,
        )
        check_bad_images(streamed)
    except Exception:
        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status="FAILED")
        check_bad_images(streamed)  # a worker stopped on too many bad images: say that, in one line
        raise
    table = _log_results(opts, splits, result, tracking_uri, run_id)
    finish_mlflow_run(tracking_uri, run_id, accuracy_table(opts.arch, table)[0])
    save_state(storage, name, _state(opts, run_id, tracking_uri, "finished"))
    art = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
    return SupertrainResult(run_id, tracking_uri, f"{art}/checkpoint/model.safetensors", run_dir, opts.preset, table)


def _log_results(opts: SupertrainOptions, splits: Splits, result, tracking_uri: str, run_id: str) -> dict:
    """Log the cell table (metrics, Markdown, CSV, heatmap), the final checkpoint and the registered model."""
    import mlflow
    from mlflow.entities import Metric

    from supervit import load_checkpoint

    from ..common.registry import log_subnet_model
    from .worker import EMA_FILE

    arch, m = opts.arch, result.metrics
    table = {
        s.name: {
            "gflops": gflops(arch, s, splits.num_classes),
            "top1": m[f"top1/{s.name}"],
            "test_top1": m[f"test_top1/{s.name}"],
        }
        for s in cells(arch)
    }
    client = mlflow.MlflowClient(tracking_uri)
    now, step = int(time.time() * 1000), opts.epochs - 1
    metrics = [Metric(f"{k}/{name}", v[k], now, step) for name, v in table.items() for k in ("top1", "test_top1")]
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp, result.checkpoint.as_directory() as ckpt_dir:
        tmp = Path(tmp)
        md, csv = accuracy_table(arch, table)
        (tmp / "accuracy_table.md").write_text(md)
        (tmp / "accuracy_table.csv").write_text(csv)
        accuracy_heatmap(arch, table, tmp / "accuracy_table.png")
        for f in ("accuracy_table.md", "accuracy_table.csv", "accuracy_table.png"):
            client.log_artifact(run_id, str(tmp / f), "results")
        ckpt_file = Path(ckpt_dir) / "model.safetensors"
        client.log_artifact(run_id, str(ckpt_file), "checkpoint")
        if (Path(ckpt_dir) / EMA_FILE).exists():
            client.log_artifact(run_id, str(Path(ckpt_dir) / EMA_FILE), "checkpoint")
        model = load_checkpoint(ckpt_file).eval()
        registered = opts.registered_model or f"supervit-{opts.preset}"
        log_subnet_model(
            model,
            arch.largest,
            tracking_uri=tracking_uri,
            run_id=run_id,
            name="largest_subnet",
            registered_model=registered,
        )
    client.set_tag(run_id, "ray.checkpoint_path", result.checkpoint.path)
    return table


def main(argv: list[str] | None = None) -> SupertrainResult:
    """CLI entry: parse, run, print the table and where to look."""
    opts, verbose = parse_options(
        SupertrainOptions,
        argv,
        "python -m pipeline.supertrain",
        "Supertrain one SuperViT (every token grid and keep rate) on Ray Train, tracked in MLflow.",
    )
    quiet_libraries(verbose)
    t0 = time.perf_counter()
    res = supertrain(opts, verbose)
    print()
    print(accuracy_table(get_arch(res.preset), res.table)[0])
    print(f"wall time {time.perf_counter() - t0:.0f}s")
    print(f"MLflow run {res.run_id} ({res.tracking_uri})")
    print(f"open it with: {ui_command(res.tracking_uri)}")
    return res
