"""Supertrain one SuperViT on Ray Train and track it in MLflow.

    python -m pipeline.supertrain                      # embedded default: preset tiny on digits, local Ray
    python -m pipeline.supertrain --preset deit_s --data /data/imagenet --workers 8 --storage s3://bucket/runs

Every option is documented by ``--help``; ``--config FILE.yaml`` takes the same options as a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supervit import ArchConfig, SubnetConfig, get_arch, gflops
from supervit.train import RECIPES

from .common import (
    Parser,
    UsageError,
    check_mlflow,
    dump_json,
    find_resume,
    init_ray,
    parse_options,
    resolve_tracking_uri,
    run_cli,
    ui_command,
    write_run_file,
)

EXPERIMENT = "supervit-supertrain"
RUN_STATE = "supervit_run.json"  # beside Ray's run folder: what --resume needs to continue the same MLflow run

# Per-preset training defaults; flags override them. DeiT's ImageNet recipe for both DeiT presets.
_DEIT = dict(
    epochs=300,
    batch_size=256,
    lr=5e-4,
    warmup_epochs=5,
    weight_decay=0.05,
    label_smoothing=0.1,
    drop_path=0.1,
    clip_grad=None,
)
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        epochs=20,
        batch_size=32,
        lr=1e-3,
        warmup_epochs=2,
        weight_decay=0.05,
        label_smoothing=0.0,
        drop_path=0.0,
        clip_grad=1.0,
    ),
    "deit_ti": _DEIT,
    "deit_s": _DEIT,
}


@dataclass
class SupertrainOptions:
    """Everything a supertraining run depends on (the CLI maps one-to-one onto these fields).

    Training fields left None take the preset's default from `TRAIN_DEFAULTS`.
    """

    preset: str = "tiny"
    data: str = "digits"
    epochs: int | None = None
    batch_size: int | None = None  # per worker
    lr: float | None = None  # peak learning rate
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    drop_path: float | None = None
    clip_grad: float | None = None
    recipe: str = "balanced"
    schedules: bool = True
    pos_init: str = "sincos"
    workers: int = 1
    cpus_per_worker: int | None = None
    gpus_per_worker: float | None = None
    address: str | None = None
    storage: str | None = None
    init_from: str | None = None
    resume: str | None = None
    mlflow_uri: str | None = None
    experiment: str = EXPERIMENT
    run_name: str | None = None
    registered_model: str | None = None
    seed: int = 0
    keep_checkpoints: int = 3
    max_failures: int = 3
    # Test hook: kill one worker process once, mid-epoch (epoch, step, marker file that makes it once only).
    inject_failure: tuple[int, int, str] | None = None

    def resolved(self) -> SupertrainOptions:
        """Fill preset defaults."""
        defaults = TRAIN_DEFAULTS.get(self.preset, TRAIN_DEFAULTS["deit_s"])
        out = dataclasses.replace(self)
        for k, v in defaults.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out


@dataclass
class SupertrainResult:
    """What a finished supertraining leaves behind."""

    run_id: str
    tracking_uri: str
    checkpoint_path: str  # own-format .safetensors of the final model
    storage_path: str
    preset: str
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # cell name -> {gflops, top1, test_top1}


# --------------------------------------------------------------------------------------------- worker side


def _cells(arch: ArchConfig) -> list[SubnetConfig]:
    """The grid x uniform-keep-rate table (the paper's table)."""
    return [SubnetConfig(g, (r,) * arch.num_stages) for g in arch.grids for r in arch.keep_rates]


def _shard(dataset, rank: int, world: int):
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world))


@torch.inference_mode()
def evaluate(model, loader, subnets, device, autocast_dtype=None) -> dict[SubnetConfig, tuple[int, int]]:
    """(correct, seen) per subnet on ``loader``; the caller sums them over workers."""
    model.eval()
    counts = {s: [0, 0] for s in subnets}
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for s in subnets:
                counts[s][0] += int((model(x, s).argmax(1) == y).sum())
                counts[s][1] += len(y)
    return {s: tuple(c) for s, c in counts.items()}


def _all_reduce_counts(counts: dict, device) -> dict[SubnetConfig, float]:
    """Top-1 (%) per subnet over every worker's shard."""
    import torch.distributed as dist

    keys = list(counts)
    t = torch.tensor([[counts[k][0], counts[k][1]] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return {k: 100.0 * float(t[i, 0]) / max(1.0, float(t[i, 1])) for i, k in enumerate(keys)}


def _param_groups(model, weight_decay: float):
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model, opts: SupertrainOptions, steps_per_epoch: int):
    """AdamW (no decay on norms, biases and embeddings), per-step warm-up + cosine schedule, and the task loss
    of resolved ``opts``: what every training loop of the project uses."""
    optimizer = torch.optim.AdamW(_param_groups(model, opts.weight_decay), lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(int(opts.warmup_epochs * steps_per_epoch), opts.epochs * steps_per_epoch)
    )
    return optimizer, scheduler, torch.nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: data shard, DDP model, supertraining epochs, checkpoint + report each epoch."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from supervit import SubnetSampler, SuperViT, load_pretrained, save_checkpoint, supertrain_step
    from supervit.data import load_data

    opts = SupertrainOptions(**config["opts"])
    arch = get_arch(opts.preset)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and opts.cpus_per_worker:
        torch.set_num_threads(opts.cpus_per_worker)
    torch.manual_seed(opts.seed)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)

    splits = load_data(opts.data, arch)
    model = SuperViT(arch, num_classes=splits.num_classes, drop_path_rate=opts.drop_path, pos_embed_init=opts.pos_init)
    if opts.init_from:
        load_pretrained(model, opts.init_from)
    # find_unused_parameters: each step uses the position embeddings of only the grids it samples.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = model.module if hasattr(model, "module") else model

    use_cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        splits.train,
        batch_size=opts.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.get("loader_workers", 0),
        pin_memory=use_cuda,
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=True)
    val_loader = torch.utils.data.DataLoader(_shard(splits.search, rank, world), batch_size=256)
    test_loader = torch.utils.data.DataLoader(_shard(splits.test, rank, world), batch_size=256)

    steps_per_epoch = len(loader)
    optimizer, scheduler, criterion = make_optimizer(core, opts, steps_per_epoch)
    autocast_dtype = None
    scaler = None
    if use_cuda:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    sampler = SubnetSampler(arch, opts.recipe, schedules=opts.schedules, seed=opts.seed)

    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        from safetensors.torch import load_file

        with ckpt.as_directory() as d:
            core.load_state_dict(load_file(os.path.join(d, "model.safetensors"), device=str(device)))
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        start_epoch = state["epoch"] + 1

    cells = _cells(arch)
    for epoch in range(start_epoch, opts.epochs):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        seen = 0
        for step, (x, y) in enumerate(loader):
            if opts.inject_failure and rank == world - 1:
                _maybe_fail(opts.inject_failure, epoch, step)
            losses = supertrain_step(
                model, x, y, sampler.sample(), optimizer, criterion, autocast_dtype, scaler, opts.clip_grad
            )
            scheduler.step()
            seen += len(y)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
        epoch_time = time.perf_counter() - t0
        metrics: dict[str, float] = {f"loss/{k}": v / max(1, steps_per_epoch) for k, v in sums.items()}
        metrics.update(
            epoch=epoch,
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=epoch_time,
            images_per_s=seen * world / epoch_time,
        )
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        last = epoch == opts.epochs - 1
        subnets = cells if last else [arch.largest, arch.smallest]
        val = _all_reduce_counts(evaluate(model, val_loader, subnets, device, autocast_dtype), device)
        metrics["top1/full"] = val[arch.largest]
        metrics["top1/smallest"] = val[arch.smallest]
        if last:
            test = _all_reduce_counts(evaluate(model, test_loader, cells, device, autocast_dtype), device)
            for s in cells:
                metrics[f"top1/{s.name}"] = val[s]
                metrics[f"test_top1/{s.name}"] = test[s]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    os.path.join(tmp, "model.safetensors"),
                    core,
                    extra={"epoch": epoch, "data": opts.data, "preset": opts.preset, "num_classes": splits.num_classes},
                )
                torch.save(
                    {
                        "epoch": epoch,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "sampler": sampler.state_dict(),
                    },
                    os.path.join(tmp, "train_state.pt"),
                )
                # The epoch's metrics travel with its checkpoint, so a resumed run can log what a killed
                # driver persisted but never logged.
                Path(tmp, "metrics.json").write_text(json.dumps(metrics))
                checkpoint = Checkpoint.from_directory(tmp)
            # Every rank reports (it is a barrier); rank 0 carries the checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_fail(spec: tuple[int, int, str], epoch: int, step: int) -> None:
    fail_epoch, fail_step, marker = spec
    if (epoch, step) == (fail_epoch, fail_step) and not os.path.exists(marker):
        Path(marker).write_text(f"killed at epoch {epoch} step {step}\n")
        os.kill(os.getpid(), 9)


# --------------------------------------------------------------------------------------------- driver side


def log_epoch(client, run_id: str, metrics: dict) -> bool:
    """Log one checkpointed epoch's metrics at step = epoch, unless that epoch is already logged."""
    from mlflow.entities import Metric

    epoch = int(metrics["epoch"])
    if any(m.step == epoch for m in client.get_metric_history(run_id, "top1/full")):
        return False
    now = int(time.time() * 1000)
    per_epoch = {k: v for k, v in metrics.items() if k not in ("epoch", "node_id") and not _is_cell_metric(k)}
    # top1/full last: its presence marks the epoch as logged.
    keys = sorted(per_epoch, key=lambda k: k == "top1/full")
    client.log_batch(run_id, metrics=[Metric(k, float(per_epoch[k]), now, epoch) for k in keys])
    return True


def backfill_epochs(client, run_id: str, run_dir: str) -> list[int]:
    """Log the epochs whose checkpoints are in ``run_dir`` (local path or bucket URI) but not in MLflow."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_dir if "://" in run_dir else str(Path(run_dir).resolve()))
    logged = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return logged
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/metrics.json") as f:
                metrics = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            continue
        if log_epoch(client, run_id, metrics):
            logged.append(int(metrics["epoch"]))
    return logged


class MlflowEpochLogger:
    """Ray Train callback (runs in the controller): logs each checkpointed epoch's metrics to MLflow.

    Metrics are logged when their checkpoint is persisted, so an epoch lost to a failure is neither logged
    twice nor left out: it is redone from the last checkpoint and logged once then. (A driver killed between
    persisting a checkpoint and logging it is covered by `backfill_epochs` on --resume.)
    """

    def __init__(self, tracking_uri: str, run_id: str, epochs: int) -> None:
        self.tracking_uri, self.run_id, self.epochs = tracking_uri, run_id, epochs

    def after_report(self, run_context, metrics, checkpoint) -> None:
        import mlflow

        if checkpoint is None or not metrics:
            return
        m = metrics[0]
        client = mlflow.MlflowClient(self.tracking_uri)
        log_epoch(client, self.run_id, m)
        # Where the workers ran (every rank reports, so this lists every node of the worker group).
        client.set_tag(self.run_id, "ray.worker_nodes", ",".join(sorted({w.get("node_id", "") for w in metrics})))
        client.set_tag(self.run_id, "last_checkpoint", checkpoint.path)
        print(
            f"epoch {int(m['epoch']) + 1}/{self.epochs}  "
            + "  ".join(f"{k.removeprefix('loss/')} {m[k]:.3f}" for k in m if k.startswith("loss/"))
            + f"  lr {m['lr']:.2e}  {m['images_per_s']:.0f} img/s  {m['epoch_time_s']:.1f}s"
            + f"  top1 full {m['top1/full']:.1f}  smallest {m['top1/smallest']:.1f}",
            flush=True,
        )

    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


def _is_cell_metric(key: str) -> bool:
    return key.startswith("test_top1/") or (key.startswith("top1/g") and "_k" in key)


def _make_callback(tracking_uri: str, run_id: str, epochs: int):
    import ray.train

    # Subclass at call time so the module imports without Ray Train's callback base.
    cls = type("MlflowEpochLoggerCallback", (MlflowEpochLogger, ray.train.UserCallback), {})
    return cls(tracking_uri, run_id, epochs)


def _validate(opts: SupertrainOptions):
    """Check everything checkable before Ray or training starts; return (arch, splits)."""
    from supervit import load_pretrained
    from supervit.data import DataError, load_data, verify

    try:
        arch = get_arch(opts.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if opts.recipe not in RECIPES:
        raise UsageError(f"unknown recipe {opts.recipe!r}; choose one of {', '.join(RECIPES)}")
    for name in ("epochs", "batch_size", "workers"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.lr <= 0 or opts.warmup_epochs < 0 or opts.weight_decay < 0:
        raise UsageError("--lr must be positive, --warmup-epochs and --weight-decay not negative")
    try:
        splits = load_data(opts.data, arch)
        verify(splits)
    except DataError:
        raise
    if len(splits.train) < opts.batch_size * opts.workers:
        raise UsageError(
            f"dataset {opts.data}: {len(splits.train)} training images, fewer than one global batch "
            f"({opts.batch_size} x {opts.workers} workers)"
        )
    if opts.init_from:
        from supervit import SuperViT

        load_pretrained(SuperViT(arch, num_classes=splits.num_classes), opts.init_from)  # CheckpointError if not
    return arch, splits


def _default_storage() -> str:
    return str(Path("ray_results").resolve())


def supertrain(opts: SupertrainOptions) -> SupertrainResult:
    """Run (or resume) one supertraining and log it to MLflow. Bad input raises `UsageError` (or a
    `CheckpointError`/`DataError`) before anything starts."""
    import mlflow
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = opts.storage or _default_storage()
    tracking_uri = resolve_tracking_uri(opts.mlflow_uri)
    resume_state = None
    if opts.resume is not None:
        run_name, resume_state = find_resume(storage, opts.resume or None, RUN_STATE, "run")
        keep = {k: getattr(opts, k) for k in ("address", "storage", "mlflow_uri", "inject_failure")}
        opts = SupertrainOptions(**{**resume_state["options"], **{k: v for k, v in keep.items() if v is not None}})
        tracking_uri = resolve_tracking_uri(opts.mlflow_uri or resume_state["tracking_uri"])
    else:
        run_name = opts.run_name or f"supertrain-{opts.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = opts.resolved()
    check_mlflow(tracking_uri)
    arch, splits = _validate(opts)

    init_ray(opts.address)
    resources = ray.cluster_resources()
    use_gpu = (opts.gpus_per_worker or 0) > 0 if opts.gpus_per_worker is not None else resources.get("GPU", 0) > 0
    cpus = opts.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // opts.workers)
    opts.cpus_per_worker = cpus
    per_worker = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = opts.gpus_per_worker or 1

    mlflow.set_tracking_uri(tracking_uri)
    if resume_state:
        run_id = resume_state["mlflow_run_id"]
        client = mlflow.MlflowClient(tracking_uri)
        client.update_run(run_id, status="RUNNING")
        backfill_epochs(client, run_id, f"{storage.rstrip('/')}/{run_name}")
    else:
        exp = mlflow.set_experiment(opts.experiment)
        run = mlflow.MlflowClient(tracking_uri).create_run(
            exp.experiment_id,
            run_name=run_name,
            tags={
                "supervit.stage": "supertrain",
                "preset": opts.preset,
                "dataset": splits.name,
                "recipe": opts.recipe,
                "ray.run_name": run_name,
                "ray.storage_path": f"{storage.rstrip('/')}/{run_name}",
            },
        )
        run_id = run.info.run_id
        client = mlflow.MlflowClient(tracking_uri)
        params = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("inject_failure",)}
        params.update({f"arch.{k}": v for k, v in arch.to_dict().items()})
        params.update(
            train_size=len(splits.train),
            search_size=len(splits.search),
            test_size=len(splits.test),
            num_classes=splits.num_classes,
            storage=storage,
            run_name=run_name,
            use_gpu=use_gpu,
            ray_version=ray.__version__,
            torch_version=torch.__version__,
            gflops_full=round(gflops(arch), 4),
        )
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    state = {
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "status": "running",
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "inject_failure"},
    }
    write_run_file(storage, run_name, RUN_STATE, dump_json(state))

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"opts": dataclasses.asdict(opts)},
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=opts.keep_checkpoints),
            failure_config=FailureConfig(max_failures=opts.max_failures),
            callbacks=[_make_callback(tracking_uri, run_id, opts.epochs)],
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return _finish(opts, arch, splits, result, client, run_id, tracking_uri, storage, run_name)


def _finish(opts, arch, splits, result, client, run_id, tracking_uri, storage, run_name) -> SupertrainResult:
    """Log the final table, checkpoint and model; mark the run finished."""
    import mlflow
    from mlflow.entities import Metric

    from supervit import load_checkpoint

    m = result.metrics
    cells = _cells(arch)
    table = {
        s.name: {
            "gflops": gflops(arch, s, splits.num_classes),
            "top1": m[f"top1/{s.name}"],
            "test_top1": m[f"test_top1/{s.name}"],
        }
        for s in cells
    }
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"{k}/{name}", v[k2], now, opts.epochs - 1)
            for name, v in table.items()
            for k, k2 in (("top1", "top1"), ("test_top1", "test_top1"))
        ],
    )
    with tempfile.TemporaryDirectory() as tmp, result.checkpoint.as_directory() as ckpt_dir:
        tmp = Path(tmp)
        md, csv = _table_text(arch, table)
        (tmp / "accuracy_table.md").write_text(md)
        (tmp / "accuracy_table.csv").write_text(csv)
        _heatmap(arch, table, tmp / "accuracy_table.png")
        for name in ("accuracy_table.md", "accuracy_table.csv", "accuracy_table.png"):
            client.log_artifact(run_id, str(tmp / name), "results")
        ckpt_file = Path(ckpt_dir) / "model.safetensors"
        client.log_artifact(run_id, str(ckpt_file), "checkpoint")
        model = load_checkpoint(ckpt_file).eval()
        _log_model(model, arch, run_id, tracking_uri, opts.registered_model or f"supervit-{opts.preset}")
    client.set_tag(run_id, "ray.checkpoint_path", result.checkpoint.path)
    client.set_terminated(run_id, status="FINISHED")
    state = {
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "status": "finished",
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "inject_failure"},
    }
    write_run_file(storage, run_name, RUN_STATE, dump_json(state))
    art = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
    return SupertrainResult(
        run_id,
        tracking_uri,
        f"{art}/checkpoint/model.safetensors",
        f"{storage.rstrip('/')}/{run_name}",
        opts.preset,
        table,
    )


class FixedSubnet(torch.nn.Module):
    """A SuperViT pinned to one subnet: what `mlflow.pytorch.log_model` exports (a traced, fixed graph)."""

    def __init__(self, model, subnet: SubnetConfig) -> None:
        super().__init__()
        self.model, self.subnet = model, subnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.subnet)


def _log_model(model, arch: ArchConfig, run_id: str, tracking_uri: str, registered_name: str) -> None:
    import mlflow

    example = torch.randn(1, arch.in_chans, arch.img_size, arch.img_size)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            FixedSubnet(model, arch.largest),
            name="largest_subnet",
            input_example=example.numpy(),
            registered_model_name=registered_name,
        )


def _table_text(arch: ArchConfig, table: dict) -> tuple[str, str]:
    rates = arch.keep_rates
    md = ["| grid \\ keep | " + " | ".join(f"{r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    csv = ["grid,keep_rate,gflops,top1,test_top1"]
    for g in arch.grids:
        row = []
        for r in rates:
            name = SubnetConfig(g, (r,) * arch.num_stages).name
            c = table[name]
            row.append(f"{c['top1']:.1f} / {c['test_top1']:.1f} ({c['gflops'] * 1e3:.1f} MFLOPs)")
            csv.append(f"{g},{r:g},{c['gflops']:.6f},{c['top1']:.2f},{c['test_top1']:.2f}")
        md.append(f"| {g} | " + " | ".join(row) + " |")
    header = "Top-1 (%) validation / test, and FLOPs, per token grid and keep rate\n\n"
    return header + "\n".join(md) + "\n", "\n".join(csv) + "\n"


def _heatmap(arch: ArchConfig, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = arch.keep_rates
    grid = [[table[SubnetConfig(g, (r,) * arch.num_stages).name]["top1"] for r in rates] for g in arch.grids]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rates), 1.2 + 0.8 * len(arch.grids)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, g in enumerate(arch.grids):
        for j, r in enumerate(rates):
            c = table[SubnetConfig(g, (r,) * arch.num_stages).name]
            ax.text(
                j,
                i,
                f"{c['top1']:.1f}%\n{c['gflops'] * 1e3:.1f} MFLOPs",
                ha="center",
                va="center",
                color="w" if c["top1"] < max(map(max, grid)) - 5 else "k",
                fontsize=8,
            )
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_yticks(range(len(arch.grids)), [str(g) for g in arch.grids])
    ax.set_xlabel("keep rate (every stage)")
    ax.set_ylabel("token grid")
    ax.set_title(f"SuperViT {arch.name}: validation top-1")
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option maps onto a `SupertrainOptions` field."""
    p = Parser(
        prog="python -m pipeline.supertrain",
        description="Supertrain one SuperViT (every token grid and keep rate) on Ray Train, tracked in MLflow.",
    )
    a = p.add_argument
    a("--config", metavar="FILE.yaml", help="YAML file with any of these options (flags override it)")
    a("--preset", default="tiny", help="architecture preset: tiny (default), deit_ti, deit_s")
    a(
        "--data",
        default="digits",
        help="digits (default, ships with scikit-learn), synthetic, an ImageFolder root (train/<class>/*, "
        "val/<class>/*), or a Parquet file, folder or glob (columns image, label)",
    )
    a("--epochs", type=int, help="training epochs (preset default: tiny 20, deit 300)")
    a("--batch-size", type=int, help="images per worker per step (preset default)")
    a("--lr", type=float, help="peak learning rate after warm-up (preset default)")
    a("--warmup-epochs", type=float, help="linear warm-up before cosine decay (preset default)")
    a("--weight-decay", type=float, help="AdamW weight decay (preset default 0.05)")
    a("--label-smoothing", type=float, help="label smoothing of the task loss (preset default)")
    a("--drop-path", type=float, help="stochastic depth rate (preset default)")
    a("--clip-grad", type=float, help="max gradient norm (preset default)")
    a(
        "--recipe",
        default=SupertrainOptions.recipe,
        choices=RECIPES,
        help="supertraining recipe (default: balanced; seed: the paper's, for reproduction; see README)",
    )
    a(
        "--no-schedules",
        dest="schedules",
        action="store_false",
        help="train uniform keep rates only (default: also per-stage schedules, as a search may pick them)",
    )
    a(
        "--pos-init",
        default="sincos",
        choices=["sincos", "trunc_normal"],
        help="position-embedding initialisation (default sincos: faster from scratch; ignored with --init-from)",
    )
    a("--workers", type=int, default=1, help="Ray Train workers (DDP processes), default 1")
    a("--cpus-per-worker", type=int, help="CPUs per worker (default: the cluster's CPUs / workers)")
    a("--gpus-per-worker", type=float, help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    a("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started here)")
    a("--storage", help="Ray storage path for checkpoints: a local folder or a bucket URI (default ./ray_results)")
    a("--init-from", metavar="CKPT", help="initialise from a timm DeiT, official SuperViT or own checkpoint")
    a(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_NAME",
        help="continue an interrupted run (default: the newest unfinished one in --storage) into the same MLflow run",
    )
    a("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    a("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    a("--run-name", help="run name in Ray storage and MLflow (default: supertrain-<preset>-<time>)")
    a("--registered-model", help="MLflow registered model name (default supervit-<preset>)")
    a("--seed", type=int, default=0, help="random seed (default 0)")
    a("--keep-checkpoints", type=int, default=3, help="checkpoints kept in Ray storage (default 3)")
    a("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint (default 3)")
    return p


def main(argv: list[str] | None = None) -> SupertrainResult:
    """CLI entry: parse, run, print the table and where to look."""
    opts = parse_options(build_parser(), SupertrainOptions, argv)
    t0 = time.perf_counter()
    res = supertrain(opts)
    print()
    arch = get_arch(res.preset)
    print(_table_text(arch, res.table)[0])
    print(f"wall time {time.perf_counter() - t0:.0f}s")
    print(f"MLflow run {res.run_id} ({res.tracking_uri})")
    print(f"open it with: {ui_command(res.tracking_uri)}")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
