"""Ray Train glue of `pipeline.supertrain`: the per-worker loop, the MLflow epoch logger, and backfill.

The training itself is the library's (`supervit.train_one_epoch`, `supervit.evaluate`); this module adds what
Ray Train needs around it: the worker's device and data shard, DDP, checkpoints reported every epoch (and
restored after a failure), and the epoch metrics that travel with each checkpoint to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from supervit import SubnetConfig, SubnetSampler, SuperViT, Training, evaluate, make_training, train_one_epoch
from supervit.data import redact

from ..common.console import Console
from ..common.runs import maybe_fail
from .report import cells

if TYPE_CHECKING:
    from .options import SupertrainOptions

__all__ = [
    "train_loop_per_worker",
    "Streamed",
    "make_worker",
    "evaluate_worker",
    "log_epoch",
    "backfill_epochs",
    "make_epoch_logger",
]

PROGRESS_EVERY_S = 10.0  # how often rank 0 reports progress within an epoch
EMA_FILE = "model_ema.safetensors"  # beside model.safetensors in a checkpoint, with --model-ema


# ------------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class Streamed:
    """File-backed data reaches the workers as Ray Train dataset shards (``train``, ``search``, ``test``);
    this is what a worker needs to know of it besides."""

    num_classes: int
    train_size: int
    ledger: Any  # the run's `BadImageLedger` actor
    max_bad_images: int


@dataclass
class _Worker:
    """One worker's share of the job."""

    rank: int
    world: int
    device: torch.device
    num_classes: int
    model: torch.nn.Module  # DDP-wrapped when world > 1
    core: SuperViT
    loader: Any
    val_loader: Any
    test_loader: Any
    training: Training
    sampler: SubnetSampler


def make_worker(
    opts: SupertrainOptions,
    rank: int = 0,
    world: int = 1,
    device: str | torch.device = "cpu",
    streamed: Streamed | None = None,
    say: Callable[[str], None] | None = None,
) -> _Worker:
    """Data, model, loaders, optimizer and sampler of one worker, as the training loop uses them.

    Inside a Ray Train worker (``world`` > 1, or ``streamed``) the model goes through Ray Train's
    ``prepare_model`` (DDP); in-memory data through a DataLoader with a distributed sampler, file-backed data
    (``streamed``) as this worker's dataset shards. Outside Ray (benchmarks: ``world`` 1, nothing streamed) the
    same objects are used plainly. ``say`` prints a line on the driver's console (warnings of bad images).
    """
    from supervit import load_pretrained

    device = torch.device(device)
    if device.type == "cpu" and opts.cpus_per_worker:
        torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    torch.manual_seed(opts.seed)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)
    if streamed is None:
        from supervit.data import load_data

        splits = load_data(opts.data, opts.arch)
        num_classes = splits.num_classes
    else:
        num_classes = streamed.num_classes
    model = SuperViT(opts.arch, num_classes, drop_path_rate=opts.drop_path, pos_embed_init=opts.pos_init)
    if opts.init_from:
        load_pretrained(model, opts.init_from)
    model = model.to(device)
    if streamed is not None or world > 1:
        import ray.train.torch

        # find_unused_parameters: each step uses the position embeddings of only the grids it samples.
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = model.module if hasattr(model, "module") else model
    if streamed is None:
        loaders = _memory_loaders(opts, splits, rank, world, device)
    else:
        loaders = _shard_loaders(opts, streamed, world, say)
    training = make_training(core, opts.train_config(), len(loaders[0]), device, num_classes, world)
    sampler = SubnetSampler(opts.arch, opts.recipe, schedules=opts.schedules, seed=opts.seed)
    return _Worker(rank, world, device, num_classes, model, core, *loaders, training, sampler)


def _memory_loaders(opts: SupertrainOptions, splits, rank: int, world: int, device: torch.device) -> tuple:
    """Train, validation and test loaders of an in-memory dataset; each worker evaluates its share."""
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=opts.batch_size, shuffle=True, drop_last=True, pin_memory=device.type == "cuda"
    )
    if world > 1:
        import ray.train.torch

        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=True)

    def share(ds):
        return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world)), batch_size=256)

    return loader, share(splits.search), share(splits.test)


def _shard_loaders(opts: SupertrainOptions, streamed: Streamed, world: int, say) -> tuple:
    """This worker's shards of the streamed splits; undecodable images are skipped and counted for the run."""
    import ray.train

    from ..common.batches import Batches, run_bad_images

    bad = run_bad_images(streamed.ledger, streamed.max_bad_images, say)
    steps = streamed.train_size // (opts.batch_size * world)
    train = Batches(ray.train.get_dataset_shard("train"), opts.batch_size, bad, steps, drop_last=True)
    return (train, *(Batches(ray.train.get_dataset_shard(n), 256, bad, 0) for n in ("search", "test")))


def _restore(w: _Worker) -> int:
    """Load the latest reported checkpoint, if Ray Train restarted us from one; return the next epoch."""
    import ray.train
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        w.core.load_state_dict(load_file(os.path.join(d, "model.safetensors"), device=str(w.device)))
        if w.training.ema is not None:
            w.training.ema.module.load_state_dict(load_file(os.path.join(d, EMA_FILE), device=str(w.device)))
        state = torch.load(os.path.join(d, "train_state.pt"), map_location=w.device, weights_only=True)
    w.training.load_state_dict(state)
    w.sampler.load_state_dict(state["sampler"])
    return state["epoch"] + 1


def _all_reduce_top1(counts: dict[SubnetConfig, tuple[int, int]], device: torch.device) -> dict[SubnetConfig, float]:
    """Top-1 (%) per subnet over every worker's shard."""
    import torch.distributed as dist

    keys = list(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return {k: 100.0 * float(t[i, 0]) / max(1.0, float(t[i, 1])) for i, k in enumerate(keys)}


def evaluate_worker(w: _Worker, opts: SupertrainOptions, last: bool) -> dict[str, float]:
    """Validation top-1 of the largest and smallest subnet; on the last epoch every cell on validation and test."""
    arch = opts.arch
    subnets = cells(arch) if last else [arch.largest, arch.smallest]
    val = _all_reduce_top1(evaluate(w.model, w.val_loader, subnets, w.training.autocast_dtype), w.device)
    metrics = {"top1/full": val[arch.largest], "top1/smallest": val[arch.smallest]}
    if w.training.ema is not None:
        ema = evaluate(w.training.ema.module, w.val_loader, [arch.largest], w.training.autocast_dtype)
        metrics["top1_ema/full"] = _all_reduce_top1(ema, w.device)[arch.largest]
    if last:
        test = _all_reduce_top1(evaluate(w.model, w.test_loader, subnets, w.training.autocast_dtype), w.device)
        for s in subnets:
            metrics[f"top1/{s.name}"] = val[s]
            metrics[f"test_top1/{s.name}"] = test[s]
    return metrics


def _report(w: _Worker, opts: SupertrainOptions, epoch: int, metrics: dict) -> None:
    """Rank 0 writes the checkpoint (weights, training state, the epoch's metrics); every rank reports."""
    import ray.train
    from ray.train import Checkpoint

    from supervit import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if w.rank == 0:
            data = redact(opts.data)  # the checkpoint becomes an MLflow artifact: no credentials in it
            extra = {"epoch": epoch, "data": data, "preset": opts.preset, "num_classes": w.num_classes}
            save_checkpoint(os.path.join(tmp, "model.safetensors"), w.core, extra=extra)
            if w.training.ema is not None:
                save_checkpoint(os.path.join(tmp, EMA_FILE), w.training.ema.module, extra={**extra, "ema": True})
            state = {"epoch": epoch, "sampler": w.sampler.state_dict(), **w.training.state_dict()}
            torch.save(state, os.path.join(tmp, "train_state.pt"))
            # The epoch's metrics travel with its checkpoint, so a resumed run can log what a killed driver
            # persisted but never logged.
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            checkpoint = Checkpoint.from_directory(tmp)
        # Every rank reports (it is a barrier); rank 0 carries the checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint)


def _step_hook(w: _Worker, opts: SupertrainOptions, epoch: int, console: Console | None):
    """Per-step hook: the failure drill (last rank), and rank 0's progress within the epoch."""
    steps = len(w.loader)
    last_shown = [time.perf_counter()]

    def on_step(step: int) -> None:
        if opts.inject_failure and w.rank == w.world - 1 and (epoch, step) == tuple(opts.inject_failure[:2]):
            maybe_fail(opts.inject_failure[2])
        now = time.perf_counter()
        if console is not None and w.rank == 0 and now - last_shown[0] >= PROGRESS_EVERY_S:
            last_shown[0] = now
            console.progress(epoch, opts.epochs, step, steps)

    return on_step


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its data shard, DDP model, supertraining epochs, a checkpoint reported each epoch.

    ``config``: ``{"opts": SupertrainOptions (resolved), "console": Console | None, "streamed": Streamed | None}``.
    """
    import ray
    import ray.train
    import ray.train.torch

    opts: SupertrainOptions = config["opts"]
    console: Console | None = config.get("console")
    streamed: Streamed | None = config.get("streamed")
    if streamed is not None and ray.get(streamed.ledger.over.remote()):
        return  # restarted after too many bad images: end here (no retry can help); the driver reports them
    ctx = ray.train.get_context()
    say = console.line if console is not None else None
    w = make_worker(opts, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), streamed, say)
    for epoch in range(_restore(w), opts.epochs):
        if hasattr(getattr(w.loader, "sampler", None), "set_epoch"):
            w.loader.sampler.set_epoch(epoch)  # a fresh order per epoch across the DDP shards (streamed: always)
        stats = train_one_epoch(w.model, w.loader, w.sampler, w.training, _step_hook(w, opts, epoch, console))
        metrics: dict[str, Any] = {f"loss/{k}": v for k, v in stats.losses.items()}
        metrics.update(
            epoch=epoch,
            lr=w.training.optimizer.param_groups[0]["lr"],
            epoch_time_s=stats.seconds,
            images_per_s=stats.images * w.world / stats.seconds,
            node_id=ray.get_runtime_context().get_node_id(),
        )
        metrics.update(evaluate_worker(w, opts, last=epoch == opts.epochs - 1))
        if streamed is not None:
            metrics["bad_images"] = len(ray.get(streamed.ledger.report.remote()))
        _report(w, opts, epoch, metrics)


# ---------------------------------------------------------------------------------------------- MLflow


def _is_cell_metric(key: str) -> bool:
    return key.startswith("test_top1/") or (key.startswith("top1/g") and "_k" in key)


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


def epoch_line(m: dict, epochs: int) -> str:
    """The console line of one epoch."""
    losses = "  ".join(f"{k.removeprefix('loss/')} {m[k]:.3f}" for k in m if k.startswith("loss/"))
    return (
        f"epoch {int(m['epoch']) + 1}/{epochs}  {losses}  lr {m['lr']:.2e}  {m['images_per_s']:.0f} img/s  "
        f"{m['epoch_time_s']:.1f}s  top1 full {m['top1/full']:.1f}  smallest {m['top1/smallest']:.1f}"
        + (f"  ema full {m['top1_ema/full']:.1f}" if "top1_ema/full" in m else "")
    )


class MlflowEpochLogger:
    """Ray Train callback (runs in the controller): logs each checkpointed epoch's metrics to MLflow.

    Metrics are logged when their checkpoint is persisted, so an epoch lost to a failure is neither logged
    twice nor left out: it is redone from the last checkpoint and logged once then. (A driver killed between
    persisting a checkpoint and logging it is covered by `backfill_epochs` on --resume.)
    """

    def __init__(self, tracking_uri: str, run_id: str, epochs: int, console: Console | None) -> None:
        self.tracking_uri, self.run_id, self.epochs, self.console = tracking_uri, run_id, epochs, console

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
        if self.console is not None:
            self.console.line(epoch_line(m, self.epochs))

    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


def make_epoch_logger(tracking_uri: str, run_id: str, epochs: int, console: Console | None):
    """A `MlflowEpochLogger` that is also a ``ray.train.UserCallback``."""
    import ray.train

    # Subclass at call time so the module imports without Ray Train's callback base.
    cls = type("MlflowEpochLoggerCallback", (MlflowEpochLogger, ray.train.UserCallback), {})
    return cls(tracking_uri, run_id, epochs, console)
