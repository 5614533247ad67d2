"""Supertrain one SuperViT on Ray Train and track it in MLflow.

    python -m pipeline.supertrain                      # embedded default: preset tiny on digits, local Ray
    python -m pipeline.supertrain --preset deit_s --data /data/imagenet --workers 8 --storage s3://bucket/runs

Every option is documented by ``--help``; ``--config FILE.yaml`` takes the same options as a file.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervit import ArchConfig, TrainConfig, get_arch, get_preset, gflops
from supervit.data import Augment, Splits, redact
from supervit.train import RECIPES

from . import cli
from .cli import UsageError, option, parse_options, quiet_libraries, run_cli
from .report import accuracy_heatmap, accuracy_table, cells
from .runs import (
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
from .trainer import check_bad_images, fit, place_workers, streamed_data

EXPERIMENT = "supervit-supertrain"
_PRESET_DEFAULT = "the preset's default"


@dataclass
class SupertrainOptions:
    """Everything a supertraining run depends on; the command line is generated from these fields.

    Training fields left None take the preset's `TrainConfig`; `resolved` fills them.
    """

    preset: str = option("tiny", help="architecture preset: tiny, deit_ti or deit_s")
    data: str = option(
        "digits",
        help="digits (ships with scikit-learn), synthetic, an ImageFolder root (train/<class>/*, val/<class>/*), "
        "or a Parquet file, folder or glob (columns image, label)",
    )
    epochs: int | None = option(None, help=f"training epochs ({_PRESET_DEFAULT}: tiny 20, deit 300)", min=1)
    batch_size: int | None = option(None, help=f"images per worker per step ({_PRESET_DEFAULT})", min=1)
    lr: float | None = option(None, help=f"peak learning rate after warm-up ({_PRESET_DEFAULT})")
    warmup_epochs: float | None = option(None, help=f"linear warm-up before cosine decay ({_PRESET_DEFAULT})", min=0)
    weight_decay: float | None = option(None, help=f"AdamW weight decay ({_PRESET_DEFAULT})", min=0)
    label_smoothing: float | None = option(
        None,
        help=f"label smoothing of the task loss ({_PRESET_DEFAULT})",
        min=0,
        flag=("--smoothing", "--label-smoothing"),
    )
    drop_path: float | None = option(None, help=f"stochastic depth rate ({_PRESET_DEFAULT})", min=0)
    clip_grad: float | None = option(None, help=f"max gradient norm ({_PRESET_DEFAULT})", min=0)
    lr_batch: int | None = option(
        None, help=f"global batch --lr is given for; scaled linearly to the actual one ({_PRESET_DEFAULT})", min=1
    )
    aug: str | None = option(
        None,
        help=f"RandAugment policy of the training transform, or none ({_PRESET_DEFAULT}: deit "
        "rand-m9-mstd0.5-inc1, tiny none)",
    )
    reprob: float | None = option(None, help=f"random-erasing probability ({_PRESET_DEFAULT}: deit 0.25)", min=0)
    mixup: float | None = option(None, help=f"mixup alpha, 0 for none ({_PRESET_DEFAULT}: deit 0.8)", min=0)
    cutmix: float | None = option(None, help=f"cutmix alpha, 0 for none ({_PRESET_DEFAULT}: deit 1.0)", min=0)
    repeated_aug: bool | None = option(
        None, help=f"repeated augmentation: each image 3 times per epoch ({_PRESET_DEFAULT}: deit yes)"
    )
    model_ema: bool | None = option(None, help=f"keep and evaluate an EMA of the weights ({_PRESET_DEFAULT}: deit yes)")
    recipe: str = option(
        "balanced", help="supertraining recipe (seed: the paper's, for reproduction; see README)", choices=RECIPES
    )
    schedules: bool | None = option(
        None,
        help="also train per-stage keep-rate schedules, as a search may pick them (default: yes, except for "
        "--recipe seed, which trains one keep rate for all stages as the paper does)",
    )
    pos_init: str = option(
        "sincos",
        help="position-embedding initialisation (sincos trains faster from scratch; ignored with --init-from)",
        choices=("sincos", "trunc_normal"),
    )
    workers: int = option(1, help="Ray Train workers (DDP processes)", min=1)
    cpus_per_worker: float | None = option(
        None,
        help="CPUs per worker (default: the cluster's CPUs / workers; with file-backed data half of that, the rest "
        "decodes images)",
        min=0.01,
    )
    decode_cpus: float = cli.decode_cpus_option()
    max_bad_images: int = cli.max_bad_images_option()
    gpus_per_worker: float | None = option(
        None, help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)", min=0
    )
    address: str | None = option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    storage: str | None = option(
        None, help="Ray storage for checkpoints: a local folder or a bucket URI (default ./ray_results)"
    )
    init_from: str | None = option(
        None, help="initialise from a timm DeiT, official SuperViT or own checkpoint", metavar="CKPT"
    )
    resume: str | None = option(
        None,
        help="continue an interrupted run into the same MLflow run (default: the newest unfinished one in --storage)",
        nargs="?",
        const="",
        metavar="RUN_NAME",
    )
    mlflow_uri: str | None = option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    experiment: str = option(EXPERIMENT, help="MLflow experiment")
    name: str | None = option(
        None, help="run name in Ray storage and MLflow (default: supertrain-<preset>-<data>-<n>)", flag="--run-name"
    )
    registered_model: str | None = option(None, help="MLflow registered model name (default supervit-<preset>)")
    seed: int = option(0, help="random seed")
    keep_checkpoints: int = option(3, help="checkpoints kept in Ray storage", min=1)
    max_failures: int = option(3, help="worker-group restarts from the last checkpoint", min=0)
    # Failure drill: the last worker kills itself once, at (epoch, step); the marker file makes it once only.
    inject_failure: tuple[int, int, str] | None = option(None, help="", cli=False)

    @property
    def arch(self) -> ArchConfig:
        """The preset's architecture."""
        return get_arch(self.preset)

    def resolved(self) -> SupertrainOptions:
        """Unset training fields from the preset's `TrainConfig`; ``schedules`` from the recipe."""
        try:
            train = get_preset(self.preset).train
        except ValueError as e:
            raise UsageError(str(e)) from None
        fill = {f.name: getattr(train, f.name) for f in dataclasses.fields(train) if getattr(self, f.name) is None}
        if self.schedules is None:
            fill["schedules"] = self.recipe != "seed"  # the paper: one keep rate for all stages
        return dataclasses.replace(self, **fill)

    def train_config(self) -> TrainConfig:
        """The resolved training fields."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def augment(self) -> Augment:
        """The training transform's augmentation (file-backed data)."""
        return Augment(aug=None if self.aug == "none" else self.aug, reprob=self.reprob)

    def validate(self) -> Splits:
        """Check everything checkable before Ray or training starts (resolved options); return the data, its
        training split augmented as the options say."""
        from supervit import SuperViT, load_pretrained
        from supervit.data import FileImages, build_transform, load_data, verify

        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise UsageError(f"--mixup/--cutmix mix pairs of images: --batch-size must be even, got {self.batch_size}")
        splits = load_data(self.data, self.arch)
        if isinstance(splits.train, FileImages):
            build_transform(self.arch, True, self.augment().aug, self.reprob)  # DataError: a policy timm lacks
            splits.train = splits.train.with_augment(self.augment())
        verify(splits, max_bad=self.max_bad_images)
        if len(splits.train) < self.batch_size * self.workers:
            raise UsageError(
                f"dataset {self.data}: {len(splits.train)} training images, fewer than one global batch "
                f"({self.batch_size} x {self.workers} workers)"
            )
        if self.init_from:  # CheckpointError if it does not fit
            load_pretrained(SuperViT(self.arch, num_classes=splits.num_classes), self.init_from)
        return splits


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

    from .registry import log_subnet_model
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
